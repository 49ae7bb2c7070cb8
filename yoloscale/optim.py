"""Optimizer, parameter groups and the learning-rate / momentum schedule, with Ultralytics' semantics.

Gradient scale and LR scaling (the rule the trainer logs at start):
  * global_batch = batch x devices x accumulate.
  * Each micro-step back-propagates `loss_sum x nbs / (batch x accumulate)`, where `loss_sum` is Ultralytics'
    loss (summed over the images of the micro-batch). DDP averages over devices, so the applied gradient is
    always `nbs x mean-over-the-global-batch`, whatever the number of devices or micro-steps.
  * `lr_scaling=linear`: lr = lr0 x global_batch / nbs. With SGD this reproduces Ultralytics' trainer exactly
    (it sums the loss over the global batch and scales weight decay by global_batch / nbs instead).
    `lr_scaling=none`: lr = lr0 whatever the global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from yoloscale.config import TrainConfig


def auto_accumulate(cfg: TrainConfig, world: int) -> int:
    """Micro-steps per optimizer step: explicit, or Ultralytics' rule that reaches the nominal batch."""
    return cfg.accumulate or max(round(cfg.nbs / (cfg.batch * world)), 1)


def lr_scale(cfg: TrainConfig, global_batch: int) -> float:
    return global_batch / cfg.nbs if cfg.lr_scaling == "linear" else 1.0


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Ultralytics' split: 'weight' (decayed), 'bn' (normalisation weights, no decay), 'bias' (no decay)."""
    norm_types = tuple(v for k, v in nn.__dict__.items() if "Norm" in k and isinstance(v, type))
    groups: dict[str, list[nn.Parameter]] = {"weight": [], "bn": [], "bias": []}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if "bias" in name:
                groups["bias"].append(param)
            elif isinstance(module, norm_types) or "logit_scale" in name:
                groups["bn"].append(param)
            else:
                groups["weight"].append(param)
    return groups


def build_optimizer(cfg: TrainConfig, model: nn.Module, lr: float, fused: bool = True) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW over the three groups. Fused kernels where possible: they also let a non-finite step
    be skipped on the device (`optimizer.found_inf`) without a host synchronisation. `fused=False` gives torch's
    foreach implementation (for FSDP2 + SGD where backend/fsdp.py cannot enable fused SGD on DTensors)."""
    groups = param_groups(model)
    if cfg.optimizer == "SGD":
        kw = {"lr": lr, "momentum": cfg.momentum, "nesterov": True}
        opt_cls = torch.optim.SGD
    else:
        kw = {"lr": lr, "betas": (cfg.momentum, 0.999)}
        opt_cls = torch.optim.AdamW
    param_list = [
        {"params": groups["weight"], "weight_decay": cfg.weight_decay, "name": "weight", **kw},
        {"params": groups["bn"], "weight_decay": 0.0, "name": "bn", **kw},
        {"params": groups["bias"], "weight_decay": 0.0, "name": "bias", **kw},
    ]
    return opt_cls(param_list, fused=fused, foreach=None if fused else True, **kw)


def init_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """Zero SGD's momentum buffers before the first step (call once the parameters are on their device).

    NOTE: torch's fused SGD allocates the buffers with `empty_like` on its first step and keeps them even when that
    step is skipped through `found_inf`. A skipped first step (an fp16 overflow at the GradScaler's initial scale,
    routine at the start of training) therefore left uninitialised memory in them, and the first real step wrote
    NaN into every weight (seen on an H100: every later step was skipped). Zeros give exactly torch's own first
    update (buffer = gradient)."""
    for group in optimizer.param_groups:
        if group.get("momentum", 0):
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


@dataclass
class Schedule:
    """Ultralytics' schedule as a pure function of (batch index, epoch): nothing to checkpoint but the counters.

    Per epoch: lr = base_lr x lf(epoch), lf linear from 1 to lrf (or cosine). During the first `warmup_batches`
    batches, every lr rises linearly from 0 (biases fall from warmup_bias_lr) to that value, and momentum rises
    from warmup_momentum to momentum.
    """

    cfg: TrainConfig
    base_lr: float  # lr0 x the LR-scaling factor
    scale: float  # the LR-scaling factor, applied to warmup_bias_lr too
    warmup_batches: int

    @classmethod
    def create(cls, cfg: TrainConfig, batches_per_epoch: int, scale: float) -> "Schedule":
        warmup_epochs = min(cfg.warmup_epochs, max(cfg.epochs - 1, 0))  # leave at least the last epoch un-warmed
        warmup = round(warmup_epochs * batches_per_epoch) if warmup_epochs > 0 else 0
        return cls(cfg, cfg.lr0 * scale, scale, warmup)

    def lf(self, epoch: int) -> float:
        e, lrf = self.cfg.epochs, self.cfg.lrf
        if self.cfg.cos_lr:
            return ((1 - math.cos(epoch * math.pi / e)) / 2) * (lrf - 1) + 1
        return max(1 - epoch / e, 0) * (1.0 - lrf) + lrf

    def lr(self, group: str, batch_index: int, epoch: int) -> float:
        target = self.base_lr * self.lf(epoch)
        if self.warmup_batches and batch_index <= self.warmup_batches:
            start = self.cfg.warmup_bias_lr * self.scale if group == "bias" else 0.0
            return float(np.interp(batch_index, [0, self.warmup_batches], [start, target]))
        return target

    def momentum(self, batch_index: int) -> float:
        if self.warmup_batches and batch_index <= self.warmup_batches:
            return float(np.interp(batch_index, [0, self.warmup_batches], [self.cfg.warmup_momentum, self.cfg.momentum]))
        return self.cfg.momentum

    def apply(self, optimizer: torch.optim.Optimizer, batch_index: int, epoch: int) -> None:
        """Set every group's lr (and SGD momentum / AdamW beta1) for the optimizer step ending at `batch_index`."""
        momentum = self.momentum(batch_index)
        for group in optimizer.param_groups:
            group["lr"] = self.lr(group["name"], batch_index, epoch)
            if "momentum" in group:
                group["momentum"] = momentum
