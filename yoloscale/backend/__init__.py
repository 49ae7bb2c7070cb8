"""Distributed backends: one class per backend, one module each (ddp.py, fsdp.py, zero.py), behind the interface of
base.Backend. `get(cfg)` is the one place that maps the configuration's `backend=` to its class; the rest of
yoloscale talks to a backend only through that interface. tensors.py gives the sharded EMA and MuSGD each rank's
piece of every tensor, whatever the backend.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from yoloscale.backend.base import (
    FP16_INIT_SCALE,
    Backend,
    autocast_forward,
    check_launcher_agreement,
    distributed_env_from_slurm,
    unwrap,
)

if TYPE_CHECKING:
    from yoloscale.config import TrainConfig

# backend= -> (module, class); imported when used, so a DDP run never imports FSDP's or DeepSpeed's code
BACKENDS = {
    "ddp": ("yoloscale.backend.ddp", "DDP"),
    "fsdp": ("yoloscale.backend.fsdp", "FSDP"),
    "zero1": ("yoloscale.backend.zero", "Zero1"),
    "zero2": ("yoloscale.backend.zero", "Zero2"),
    "zero3": ("yoloscale.backend.zero", "Zero3"),
}

# backend= -> what each rank holds a 1/world share of: weights, gradients, optimizer state (the rest is whole on every
# rank). Read by the memory planner (plan.py), which plans backends without importing them.
SHARDED = {
    "ddp": (False, False, False),
    "fsdp": (True, True, True),
    "zero1": (False, False, True),
    "zero2": (False, True, True),
    "zero3": (True, True, True),
}

__all__ = [
    "BACKENDS",
    "SHARDED",
    "FP16_INIT_SCALE",
    "Backend",
    "autocast_forward",
    "check_launcher_agreement",
    "distributed_env_from_slurm",
    "get",
    "layout_of",
    "memory_divisors",
    "unwrap",
]


def _class(name: str) -> type[Backend]:
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def get(cfg: TrainConfig) -> Backend:
    """The backend `cfg.backend` names, built for this run."""
    return _class(cfg.backend)(cfg)


def layout_of(name: str) -> str:
    """The checkpoint layout a backend writes (checkpoints record the backend's name)."""
    return _class(name).layout


def memory_divisors(name: str, world: int) -> tuple[int, int, int]:
    """How many ranks share the weights, the gradients and the optimizer state under backend `name`."""
    return tuple(world if sharded else 1 for sharded in SHARDED[name])  # type: ignore[return-value]
