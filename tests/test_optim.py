from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from yoloscale.config import load_config
from yoloscale.optim import Schedule, auto_accumulate, build_optimizer, init_momentum_buffers, lr_scale, param_groups


@pytest.mark.parametrize("batch, world, accumulate, expected", [(16, 1, 0, 4), (16, 2, 0, 2), (32, 8, 0, 1),
                                                               (8, 1, 0, 8), (16, 1, 3, 3)])
def test_accumulate_follows_ultralytics_rule_unless_explicit(batch, world, accumulate, expected):
    cfg = load_config(None, [f"batch={batch}", f"accumulate={accumulate}", "nbs=64"])
    assert auto_accumulate(cfg, world) == expected


def test_lr_scaling_rule():
    assert lr_scale(load_config(None, ["nbs=64"]), 256) == 4.0
    assert lr_scale(load_config(None, ["nbs=64", "lr_scaling=none"]), 256) == 1.0


def test_param_groups_match_ultralytics():
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    ours = {k: {id(p) for p in v} for k, v in param_groups(model).items()}
    stub = SimpleNamespace(args=SimpleNamespace(), data={})
    theirs = BaseTrainer.build_optimizer(stub, model, name="SGD", lr=0.01, momentum=0.9, decay=5e-4)
    theirs = {g["param_group"]: {id(p) for p in g["params"]} for g in theirs.param_groups}
    assert ours == theirs
    opt = build_optimizer(load_config(), model, lr=0.01)
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay == {"weight": 5e-4, "bn": 0.0, "bias": 0.0}


def _ultralytics_lr(cfg, nb, ni, epoch, group):
    """Ultralytics' trainer: LambdaLR per epoch, then per-batch warmup interpolation (engine/trainer.py)."""
    from ultralytics.utils.torch_utils import one_cycle

    lf = one_cycle(1, cfg.lrf, cfg.epochs) if cfg.cos_lr else (
        lambda x: max(1 - x / cfg.epochs, 0) * (1.0 - cfg.lrf) + cfg.lrf)
    nw = round(min(cfg.warmup_epochs, max(cfg.epochs - 1, 0)) * nb)
    lr = cfg.lr0 * lf(epoch)
    if nw and ni <= nw:
        lr = np.interp(ni, [0, nw], [cfg.warmup_bias_lr if group == "bias" else 0.0, lr])
    return lr


@pytest.mark.parametrize("cos_lr", [False, True])
def test_schedule_matches_ultralytics(cos_lr):
    cfg = load_config(None, ["epochs=5", "warmup_epochs=2", f"cos_lr={cos_lr}"])
    nb = 7
    sched = Schedule.create(cfg, nb, scale=1.0)
    for epoch in range(cfg.epochs):
        for i in range(nb):
            ni = epoch * nb + i
            for group in ("weight", "bn", "bias"):
                assert sched.lr(group, ni, epoch) == pytest.approx(_ultralytics_lr(cfg, nb, ni, epoch, group))
    assert sched.momentum(0) == cfg.warmup_momentum and sched.momentum(nb * 2) == cfg.momentum


def test_linear_scaling_reproduces_ultralytics_sgd():
    """Ultralytics: gradient of the loss summed over the global batch, weight decay x global/nbs, lr0.
    Ours: gradient of nbs x the mean, weight decay unscaled, lr0 x global/nbs. Same SGD trajectory."""
    torch.manual_seed(0)
    nbs, global_batch, wd, lr0 = 64, 128, 5e-4, 0.01
    x, y = torch.randn(global_batch, 5), torch.randn(global_batch, 1)
    a, b = nn.Linear(5, 1), nn.Linear(5, 1)
    b.load_state_dict(a.state_dict())
    k = global_batch / nbs
    opt_a = torch.optim.SGD(a.parameters(), lr=lr0, momentum=0.9, nesterov=True, weight_decay=wd * k)
    opt_b = torch.optim.SGD(b.parameters(), lr=lr0 * k, momentum=0.9, nesterov=True, weight_decay=wd)
    for _ in range(5):
        for model, opt, loss_fn in ((a, opt_a, lambda l: l.sum()), (b, opt_b, lambda l: l.mean() * nbs)):
            opt.zero_grad()
            loss_fn((model(x) - y) ** 2).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_a_skipped_first_step_leaves_sgd_exactly_as_if_it_never_happened():
    """Fused SGD allocates momentum buffers uninitialised on its first step, even a skipped one; ours are zeroed
    up front, so skip-then-step equals a single step."""
    torch.manual_seed(0)
    a, b = nn.Linear(64, 64), nn.Linear(64, 64)
    b.load_state_dict(a.state_dict())
    cfg = load_config()
    opt_a, opt_b = build_optimizer(cfg, a, lr=0.1), build_optimizer(cfg, b, lr=0.1)
    for opt in (opt_a, opt_b):
        init_momentum_buffers(opt)
        assert all(torch.count_nonzero(opt.state[p]["momentum_buffer"]) == 0 for p in opt.param_groups[0]["params"])
    grad = [torch.randn_like(p) for p in a.parameters()]
    for p, g in zip(a.parameters(), grad):
        p.grad = torch.full_like(p, float("nan"))
    opt_a.found_inf = torch.ones(())  # skipped (as the trainer does for a non-finite gradient norm)
    opt_a.step()
    for model, opt in ((a, opt_a), (b, opt_b)):
        for p, g in zip(model.parameters(), grad):
            p.grad = g.clone()
        opt.found_inf = torch.zeros(())
        opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
