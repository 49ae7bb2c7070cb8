"""Distributed backends: one class per backend, one module each (ddp.py, fsdp.py, zero.py), behind the interface of
base.Backend. registry.py maps the configuration's `backend=` to its class (`get(cfg)` builds it, which checks the
backend's rules); the rest of yoloscale talks to a backend only through that interface. Each backend owns its
checkpoint layout: it saves through Accelerate's save_state and loads its own layout back; full_state.py and
zero_reshard.py read any backend's layout into any run as whole tensors (another backend, another world size).
tensors.py gives the sharded EMA and MuSGD each rank's piece of every tensor, whatever the backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from yoloscale.backend.base import (
    FP16_INIT_SCALE,
    Backend,
    autocast_forward,
    check_launcher_agreement,
    unwrap,
)
from yoloscale.backend.registry import BACKENDS, backend_class, layout_of, memory_divisors

if TYPE_CHECKING:
    from yoloscale.config import TrainConfig

__all__ = [
    "BACKENDS",
    "FP16_INIT_SCALE",
    "Backend",
    "autocast_forward",
    "check_launcher_agreement",
    "get",
    "layout_of",
    "memory_divisors",
    "unwrap",
]


def get(cfg: TrainConfig) -> Backend:
    """The backend `cfg.backend` names, built for this run (which checks that it can honour the configuration)."""
    return backend_class(cfg.backend)(cfg)
