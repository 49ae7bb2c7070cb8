"""`backend=` -> its class, imported when used, so a DDP run never imports FSDP's or DeepSpeed's code."""

from __future__ import annotations

import importlib

BACKENDS = {
    "ddp": ("yoloscale.backend.ddp", "DDP"),
    "fsdp": ("yoloscale.backend.fsdp", "FSDP"),
    "zero1": ("yoloscale.backend.zero", "Zero1"),
    "zero2": ("yoloscale.backend.zero", "Zero2"),
    "zero3": ("yoloscale.backend.zero", "Zero3"),
}


def backend_class(name: str) -> type:
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def layout_of(name: str) -> str:
    """The checkpoint layout backend `name` writes (a checkpoint records the backend's name)."""
    return backend_class(name).layout


def memory_divisors(name: str, world: int) -> tuple[int, int, int]:
    """How many ranks share the weights, the gradients and the optimizer state under backend `name`."""
    return tuple(world if sharded else 1 for sharded in backend_class(name).sharded_state)  # type: ignore[return-value]
