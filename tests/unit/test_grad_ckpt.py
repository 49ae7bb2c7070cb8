"""BN-safe gradient checkpointing: same running statistics (updated once), same gradients, same names."""

import copy
import pickle
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from yoloscale.errors import UserError
from yoloscale.memory.grad_ckpt import apply_grad_ckpt, parse_selection, remove_grad_ckpt, select_layers


def _model():
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return DetectionModel("yolov8n.yaml", nc=3, verbose=False).train()


def _step(model, x):
    out = model(x)
    out = out if isinstance(out, (list, tuple)) else list(out.values())
    sum(o.float().square().mean() for o in out if torch.is_tensor(o)).backward()


@pytest.mark.parametrize(
    "selection,recompute", [("all", "all"), ("backbone", "all"), ("2-5,9", "all"), ("highres", "all"), ("all", "cheap")]
)
def test_checkpointed_step_matches_the_plain_step(selection, recompute):
    plain = _model()
    ckpt = copy.deepcopy(plain)
    chosen = apply_grad_ckpt(ckpt, selection, recompute)
    assert chosen and set(chosen) <= set(range(len(ckpt.model)))
    x = torch.rand(2, 3, 64, 64)
    for _ in range(2):
        _step(plain, x)
        _step(ckpt, x)
    a, b = plain.state_dict(), ckpt.state_dict()
    assert a.keys() == b.keys()  # names unchanged: checkpoints and exports are unaffected
    for k in a:  # running mean/var and num_batches_tracked updated exactly once per step
        assert torch.equal(a[k], b[k]), k
    assert int(b["model.0.bn.num_batches_tracked"]) == 2
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("recompute,convs_again", [("all", True), ("cheap", False)])
def test_cheap_recompute_keeps_the_convolutions(recompute, convs_again):
    """`cheap` recomputes BatchNorm and SiLU in the backward but no convolution; `all` recomputes both."""
    model = _model()
    apply_grad_ckpt(model, "all", recompute)
    out = model(torch.rand(2, 3, 64, 64))
    out = out if isinstance(out, (list, tuple)) else list(out.values())
    loss = sum(o.float().square().mean() for o in out if torch.is_tensor(o))
    with _CountOps() as backward:
        loss.backward()
    assert backward.ops["convolution_backward"] > 0
    assert (backward.ops["convolution"] > 0) == convs_again
    assert sum(n for op, n in backward.ops.items() if "batch_norm" in op and "backward" not in op) > 0


def test_eval_and_no_grad_run_the_plain_forward():
    model = _model()
    apply_grad_ckpt(model, "all")
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))  # no checkpoint machinery without autograd
    model.eval()
    model(torch.rand(1, 3, 64, 64))


def test_selection_parsing_and_errors():
    assert parse_selection("OFF") == "off" and parse_selection("") == "off"
    assert parse_selection("1-3, 7") == [1, 2, 3, 7]
    model = _model()
    assert select_layers(model, "head") == list(range(len(model.yaml["backbone"]), len(model.model)))
    assert select_layers(model, "off") == []
    with pytest.raises(UserError, match="grad_ckpt"):
        parse_selection("some")
    with pytest.raises(UserError, match="backwards"):
        parse_selection("5-2")
    with pytest.raises(UserError, match="do not exist"):
        select_layers(model, "99")
    with pytest.raises(UserError, match="grad_ckpt_recompute"):
        apply_grad_ckpt(model, "all", "some")


@pytest.mark.parametrize(
    "yaml, expected",
    [
        ("yolo11n.yaml", [*range(7), *range(11, 20)]),  # stride 2-16 backbone, the neck's stride 8/16 path
        ("yolov8n-p6.yaml", [*range(7), *range(15, 24)]),  # P6: the stride 32/64 layers 7-14 and 24-30 stay out
    ],
)
def test_highres_selects_the_layers_at_stride_16_or_finer(yaml, expected):
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(yaml, nc=3, verbose=False).train()
    assert select_layers(model, "highres") == expected
    assert model.training and all(m.training for m in model.modules())  # the probe forward ran in eval, then back
    assert not any(m._forward_hooks for m in model.modules())  # its hooks are gone


def test_highres_on_a_model_without_feature_maps_is_an_error():
    class Flat(torch.nn.Module):  # not a detector: no layer returns a 4-D feature map
        yaml = {"channels": 3}

        def __init__(self):
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2))

        def forward(self, x):
            return self.model(x)

    model = Flat()
    with pytest.raises(UserError, match="'highres' found no layer.*grad_ckpt=0-2"):
        select_layers(model, "highres")
    assert select_layers(model, "0-1") == [0, 1]


def test_removal_leaves_a_picklable_model():
    model = _model()
    apply_grad_ckpt(model, "all")
    remove_grad_ckpt(model)
    pickle.dumps(model)  # Ultralytics' .pt is a pickle: no yoloscale function may remain in it


def test_config_reads_yaml_booleans():
    from yoloscale.config import load_config

    assert load_config(None, ["grad_ckpt=off"]).grad_ckpt == "off"
    assert load_config(None, ["grad_ckpt=true"]).grad_ckpt == "all"
