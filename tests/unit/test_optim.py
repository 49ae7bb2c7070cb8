import numpy as np
import pytest
import torch
from torch import nn

from yoloscale.config import load_config
from yoloscale.training.optim import (
    OptimizerChoice,
    Schedule,
    build_optimizer,
    choose_optimizer,
    init_momentum_buffers,
)
from yoloscale.training.run_plan import capped_accumulate


@pytest.mark.parametrize(
    "batch, accumulate, batches, expected",
    [(16, 0, 100, 4), (32, 0, 100, 2), (256, 0, 100, 1), (8, 0, 100, 8), (16, 3, 100, 3), (8, 0, 3, 3)],
)
def test_accumulate_follows_ultralytics_rule_unless_explicit(batch, accumulate, batches, expected):
    """max(round(nbs / global batch), 1), capped at an epoch's batch count (so every epoch steps)."""
    cfg = load_config(None, [f"batch={batch}", f"accumulate={accumulate}", "nbs=64", "epochs=2"])
    assert capped_accumulate(cfg, batch, batches) == expected


def test_optimizer_auto_follows_ultralytics_rule():
    short = choose_optimizer(load_config(None, ["epochs=10", "batch=16"]), images=1600, nc=5, batch=16)
    assert (short.name, short.lr0, short.momentum, short.warmup_bias_lr) == ("AdamW", round(0.01 / 9, 6), 0.9, 0.0)
    long = choose_optimizer(
        load_config(None, ["epochs=500", "batch=16"]), images=1600, nc=5, batch=16
    )  # 25 x 500 > 10,000
    assert (long.name, long.lr0, long.momentum, long.warmup_bias_lr) == ("MuSGD", 0.01, 0.9, 0.0)
    given = choose_optimizer(load_config(None, ["optimizer=sgd", "lr0=0.02"]), images=1600, nc=5, batch=16)
    assert (given.name, given.lr0, given.momentum, given.warmup_bias_lr) == ("SGD", 0.02, 0.937, 0.1)


def _ultralytics_lr(cfg, nb, ni, epoch, group):
    """Ultralytics' trainer: LambdaLR per epoch, then per-batch warmup interpolation (engine/trainer.py)."""
    from ultralytics.utils.torch_utils import one_cycle

    lf = (
        one_cycle(1, cfg.lrf, cfg.epochs)
        if cfg.cos_lr
        else (lambda x: max(1 - x / cfg.epochs, 0) * (1.0 - cfg.lrf) + cfg.lrf)
    )
    nw = round(min(cfg.warmup_epochs, max(cfg.epochs - 1, 0)) * nb)
    lr = cfg.lr0 * lf(epoch)
    if nw and ni <= nw:
        lr = np.interp(ni, [0, nw], [cfg.warmup_bias_lr if group == "bias" else 0.0, lr])
    return lr


@pytest.mark.parametrize("cos_lr", [False, True])
def test_schedule_matches_ultralytics_formulas(cos_lr):
    cfg = load_config(None, ["epochs=5", "warmup_epochs=2", f"cos_lr={cos_lr}", "optimizer=SGD"])
    nb = 7
    sched = Schedule.create(cfg, choose_optimizer(cfg, 100, 3, 16), nb, accumulate=4)
    for epoch in range(cfg.epochs):
        for i in range(nb):
            ni = epoch * nb + i
            for group in ("weight", "bn", "bias"):
                g = {"param_group": group, "initial_lr": cfg.lr0}
                assert sched.lr(g, ni, epoch) == pytest.approx(_ultralytics_lr(cfg, nb, ni, epoch, group))
    assert sched.momentum_at(0) == cfg.warmup_momentum and sched.momentum_at(nb * 2) == cfg.momentum
    assert [sched.accumulate_at(ni) for ni in (0, 2, 3, 7, 14, 20)] == [1, 1, 2, 2, 4, 4]  # 2.5 rounds to even


def test_a_skipped_first_step_leaves_sgd_exactly_as_if_it_never_happened():
    """Fused SGD allocates momentum buffers uninitialised on its first step, even a skipped one; ours are zeroed
    up front, so skip-then-step equals a single step."""
    torch.manual_seed(0)
    a, b = nn.Linear(64, 64), nn.Linear(64, 64)
    b.load_state_dict(a.state_dict())
    sgd = OptimizerChoice("SGD", 0.1, 0.937, 0.1)
    opt_a, opt_b = build_optimizer(a, sgd, 5e-4), build_optimizer(b, sgd, 5e-4)
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
