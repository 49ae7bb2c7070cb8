"""Optimizer, parameter groups, and the learning-rate / momentum / accumulation schedule: Ultralytics' trainer
(`ultralytics/engine/trainer.py`, the version pinned in .ci/constraints.txt), rule for rule.

What a step means (tests/unit/test_parity.py runs Ultralytics' own trainer beside ours and compares):
  * `batch` is the global batch. Each micro-step back-propagates Ultralytics' loss (summed over the images of the
    micro-batch) times the number of devices, and DDP/FSDP2/DeepSpeed average over devices: the applied gradient is
    the sum over every image since the last optimizer step, as in Ultralytics' trainer.
  * An optimizer step follows once `accumulate` micro-steps have passed since the last one; during warmup
    `accumulate` ramps from 1 to its nominal `max(round(nbs / batch), 1)`, so early steps come every micro-step.
  * lr0 is used as given (no batch scaling); weight decay is `weight_decay x batch x accumulate / nbs`.
  * `optimizer=auto`: AdamW with lr0 = round(0.002 x 5 / (4 + nc), 6) and momentum 0.9 for runs of at most 10,000
    iterations (ceil(images / max(batch, nbs)) x epochs), else MuSGD at lr0 0.01, momentum 0.9; warmup_bias_lr 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from ultralytics.optim import MuSGD

from yoloscale.config import TrainConfig
from yoloscale.training.musgd import MUON_SCALE, SGD_SCALE, ShardedMuSGD

AUTO_ITERATIONS = 10_000  # Ultralytics' optimizer=auto threshold
ADAM_FAMILY = ("Adam", "Adamax", "AdamW", "NAdam", "RAdam")
FUSED = ("SGD", "Adam", "AdamW")  # torch has fused kernels for these; they skip a bad step on the device


@dataclass(frozen=True)
class OptimizerChoice:
    """What `optimizer=` resolves to for this run (optimizer=auto decides from the run's length and classes)."""

    name: str
    lr0: float
    momentum: float
    warmup_bias_lr: float
    reason: str = ""


def choose_optimizer(cfg: TrainConfig, images: int, nc: int, batch: int, chosen: str = "") -> OptimizerChoice:
    """Ultralytics' `build_optimizer(name='auto')` rule (`batch`: the global batch, as Ultralytics' after its
    AutoBatch); any other name is taken with the configured lr0/momentum. `chosen`: what auto chose when the run
    started (a resume keeps it, even where a changed `epochs` would tip the rule the other way)."""
    if cfg.optimizer != "auto":
        return OptimizerChoice(cfg.optimizer, cfg.lr0, cfg.momentum, cfg.warmup_bias_lr)
    iterations = math.ceil(images / max(batch, cfg.nbs)) * cfg.epochs
    why = f"optimizer=auto: {iterations} iterations (ceil({images} images / max(batch, nbs)) x {cfg.epochs} epochs)"
    if chosen:
        why = f"optimizer=auto chose {chosen} when this run started"
    if chosen == "MuSGD" or not chosen and iterations > AUTO_ITERATIONS:
        return OptimizerChoice("MuSGD", 0.01, 0.9, 0.0, f"{why} > {AUTO_ITERATIONS}: MuSGD, lr0 0.01, momentum 0.9")
    lr = round(0.002 * 5 / (4 + nc), 6)
    return OptimizerChoice(
        "AdamW", lr, 0.9, 0.0, f"{why} <= {AUTO_ITERATIONS}: AdamW, lr0 {lr} (nc={nc}), momentum 0.9"
    )


def scaled_weight_decay(cfg: TrainConfig, batch: int, accumulate: int) -> float:
    return cfg.weight_decay * batch * accumulate / cfg.nbs


def param_groups(model: nn.Module, muon: bool, weight_decay: float, lr: float) -> list[dict]:
    """Ultralytics' parameter groups, in its order: 'weight' (decayed), 'bn' (normalisation weights, no decay), 'bias'
    (no decay); with MuSGD also 'muon' (every 2-D/4-D parameter, decayed), and each group split in two, the
    classification head's parameters (Detect.cv3, one2one_cv3) at 3 x lr first."""
    norm_types = tuple(v for k, v in nn.__dict__.items() if "Norm" in k and isinstance(v, type))
    named: dict[str, list[nn.Parameter]] = {"weight": [], "bn": [], "bias": [], "muon": []}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if muon and param.ndim in (2, 4):
                named["muon"].append(param)
            elif "bias" in full:
                named["bias"].append(param)
            elif isinstance(module, norm_types) or "logit_scale" in full:
                named["bn"].append(param)
            else:
                named["weight"].append(param)
    decay = {"weight": weight_decay, "bn": 0.0, "bias": 0.0, "muon": weight_decay}
    groups = [
        {"params": named[k], "param_group": k, "weight_decay": decay[k], "lr": lr}
        for k in ("weight", "bn", "bias", "muon")
        if k != "muon" or muon
    ]
    if not muon:
        return groups
    head = model.model[-1]
    boosted = {
        id(p) for m in (getattr(head, "cv3", None), getattr(head, "one2one_cv3", None)) if m for p in m.parameters()
    }
    split = []
    for g in groups:
        split.append(
            {
                **g,
                "params": [p for p in g["params"] if id(p) in boosted],
                "lr": lr * 3,
                "use_muon": g["param_group"] == "muon",
            }
        )
        split.append(
            {**g, "params": [p for p in g["params"] if id(p) not in boosted], "use_muon": g["param_group"] == "muon"}
        )
    return split


def build_optimizer(
    model: nn.Module, choice: OptimizerChoice, weight_decay: float, fused: bool = True, sharded: bool = False
) -> torch.optim.Optimizer:
    """The optimizer Ultralytics builds for `choice`, over its parameter groups. SGD/Adam/AdamW use torch's fused
    kernels where `fused` (they skip a non-finite step on the device, `optimizer.found_inf`, without a host sync).
    MuSGD is Ultralytics' own class; `sharded=True` gives its sharded form (musgd.py), which orthogonalises whole
    matrices from FSDP2 shards or ZeRO partitions once the backend has attached their layout."""
    name, lr, momentum = choice.name, choice.lr0, choice.momentum
    groups = param_groups(model, name == "MuSGD", weight_decay, lr)
    for g in groups:
        g["initial_lr"] = g["lr"]  # what LambdaLR records and Ultralytics' warmup reads
    if name == "MuSGD":
        if sharded:
            return ShardedMuSGD(groups, lr=lr, momentum=momentum, nesterov=True)
        return MuSGD(groups, lr=lr, momentum=momentum, nesterov=True, muon=MUON_SCALE, sgd=SGD_SCALE)
    fused_kw = {"fused": True} if fused and name in FUSED else {"foreach": True}
    if name in ADAM_FAMILY:
        if name in ("Adamax", "NAdam", "RAdam"):  # no fused kernels in torch
            fused_kw = {"foreach": True}
        return getattr(torch.optim, name)(groups, lr=lr, betas=(momentum, 0.999), weight_decay=0.0, **fused_kw)
    if name == "RMSprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=momentum, foreach=True)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, **fused_kw)


HYPERPARAMETERS = ("initial_lr", "weight_decay", "momentum", "betas")


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each group's settings that come from the configuration (not its parameters or their state)."""
    return [{k: g[k] for k in HYPERPARAMETERS if k in g} for g in optimizer.param_groups]


def restore_hyperparameters(
    optimizer: torch.optim.Optimizer, built: list[dict], schedule: Schedule, choice: OptimizerChoice, ni: int
) -> None:
    """After loading a checkpoint's optimizer state, which brings the saved run's lr0, momentum and weight decay
    along: this run's values (as `built` from its configuration), with momentum where the schedule has it by now."""
    for group, settings in zip(optimizer.param_groups, built):
        group.update(settings)
        if "momentum" in group:
            group["momentum"] = schedule.momentum_after(ni, choice.momentum)


def init_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """Zero SGD's momentum buffers before the first step (call once the parameters are on their device).

    NOTE: torch's fused SGD allocates the buffers with `empty_like` on its first step and keeps them even when that
    step is skipped through `found_inf`. A skipped first step (an fp16 overflow at the GradScaler's initial scale,
    routine at the start of training) therefore left uninitialised memory in them, and the first real step wrote
    NaN into every weight (every later step was then skipped). Zeros give exactly torch's own first
    update (buffer = gradient)."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group.get("momentum", 0):
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


@dataclass
class Schedule:
    """Ultralytics' schedule as a pure function of (batch index `ni`, epoch): nothing to checkpoint but the counters.

    Per epoch: lr = initial_lr x lf(epoch), lf linear from 1 to lrf (or cosine). During the first `warmup_batches`
    batches every group's lr rises linearly from 0 (biases fall from warmup_bias_lr) to that value, momentum rises
    from warmup_momentum to momentum (SGD-like groups only: Adam's beta1 stays), and accumulate from 1 to nominal.
    """

    epochs: int
    lrf: float
    cos_lr: bool
    warmup_batches: int
    warmup_bias_lr: float
    warmup_momentum: float
    momentum: float
    accumulate: int  # nominal, after warmup

    @classmethod
    def create(
        cls, cfg: TrainConfig, choice: OptimizerChoice, batches_per_epoch: int, accumulate: int, epochs: int = 0
    ) -> Schedule:
        """`epochs`: the run's length when time= re-estimates it (else cfg.epochs)."""
        epochs = epochs or cfg.epochs
        warmup_epochs = min(cfg.warmup_epochs, max(epochs - 1, 0))  # leave at least the last epoch un-warmed
        warmup = round(warmup_epochs * batches_per_epoch) if warmup_epochs > 0 else 0
        # NOTE: warmup ramps momentum to cfg.momentum even under optimizer=auto, whose optimizer starts at 0.9:
        # Ultralytics' auto rule changes args.lr0 but not args.momentum, which its warmup reads.
        return cls(
            epochs,
            cfg.lrf,
            cfg.cos_lr,
            warmup,
            choice.warmup_bias_lr,
            cfg.warmup_momentum,
            cfg.momentum,
            accumulate,
        )

    def in_warmup(self, ni: int) -> bool:
        return bool(self.warmup_batches) and ni <= self.warmup_batches

    def lf(self, epoch: int) -> float:
        e, lrf = self.epochs, self.lrf
        if self.cos_lr:
            return ((1 - math.cos(epoch * math.pi / e)) / 2) * (lrf - 1) + 1
        return max(1 - epoch / e, 0) * (1.0 - lrf) + lrf

    def lr(self, group: dict, ni: int, epoch: int) -> float:
        target = group["initial_lr"] * self.lf(epoch)
        if self.in_warmup(ni):
            start = self.warmup_bias_lr if group.get("param_group") == "bias" else 0.0
            return float(np.interp(ni, [0, self.warmup_batches], [start, target]))
        return target

    def momentum_at(self, ni: int) -> float:
        if self.in_warmup(ni):
            return float(np.interp(ni, [0, self.warmup_batches], [self.warmup_momentum, self.momentum]))
        return self.momentum

    def accumulate_at(self, ni: int) -> int:
        if self.in_warmup(ni):
            return max(1, int(np.interp(ni, [0, self.warmup_batches], [1, self.accumulate]).round()))
        return self.accumulate

    def momentum_after(self, ni: int, initial: float) -> float:
        """A group's momentum once `ni` micro-batches have been scheduled: warmup's last value, else `initial`."""
        return self.momentum_at(min(ni - 1, self.warmup_batches)) if self.warmup_batches and ni > 0 else initial

    def apply(self, optimizer: torch.optim.Optimizer, ni: int, epoch: int) -> None:
        """Every group's lr (and momentum, where the group has one) for micro-batch `ni` of `epoch`."""
        warm = self.in_warmup(ni)
        for group in optimizer.param_groups:
            group["lr"] = self.lr(group, ni, epoch)
            if warm and "momentum" in group:
                group["momentum"] = self.momentum_at(ni)
