"""BN-safe gradient checkpointing: same running statistics (updated once), same gradients, same names."""

import copy
import pickle

import pytest
import torch

from yoloscale.errors import UserError
from yoloscale.grad_ckpt import apply_grad_ckpt, parse_selection, remove_grad_ckpt, select_layers


def _model():
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return DetectionModel("yolov8n.yaml", nc=3, verbose=False).train()


def _step(model, x):
    out = model(x)
    out = out if isinstance(out, (list, tuple)) else list(out.values())
    sum(o.float().square().mean() for o in out if torch.is_tensor(o)).backward()


@pytest.mark.parametrize("selection", ["all", "backbone", "2-5,9"])
def test_checkpointed_step_matches_the_plain_step(selection):
    plain = _model()
    ckpt = copy.deepcopy(plain)
    chosen = apply_grad_ckpt(ckpt, selection)
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


def test_removal_leaves_a_picklable_model():
    model = _model()
    apply_grad_ckpt(model, "all")
    remove_grad_ckpt(model)
    pickle.dumps(model)  # Ultralytics' .pt is a pickle: no yoloscale function may remain in it


def test_config_reads_yaml_booleans():
    from yoloscale.config import load_config

    assert load_config(None, ["grad_ckpt=off"]).grad_ckpt == "off"
    assert load_config(None, ["grad_ckpt=true"]).grad_ckpt == "all"
