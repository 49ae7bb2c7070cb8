"""GPU memory, as a run meets it: what was reached, freeing it after an out-of-memory error, and the one line that
says what to try when a batch does not fit."""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch


class OutOfMemory(Exception):
    """A CUDA out-of-memory error inside a training step (caught by the epoch loop)."""


def reached_gib(device: torch.device) -> tuple[float, float]:
    """(peak memory reserved, the device's total) in GiB; zeros off CUDA."""
    if device.type != "cuda":
        return 0.0, 0.0
    return torch.cuda.max_memory_reserved(device) / 2**30, torch.cuda.get_device_properties(device).total_memory / 2**30


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def does_not_fit(
    device_batch: int,
    batch: int,
    world: int,
    imgsz: int,
    accumulate: int,
    grad_ckpt: str,
    device: torch.device,
    error: str,
) -> str:
    """The one-line message for a batch that does not fit, naming what would."""
    peak, total = reached_gib(device)
    hint = "" if grad_ckpt != "off" else ", or grad_ckpt=highres (about 60% less activation memory)"
    first = error.strip().splitlines()[0][:200] if error.strip() else ""
    return (
        f"out of memory at device_batch {device_batch} (batch {batch} over {world} device(s)), imgsz {imgsz}: "
        f"{peak:.1f} of {total:.1f} GiB reached on {device}. Try device_batch={max(device_batch // 2, 1)} with "
        f"accumulate={2 * accumulate} (same global batch){hint}. ({first})"
    )


def next_batch(old: int, peak_gib: float, predict: Callable[[int], float] | None) -> int:
    """The per-device batch to retry at after an out-of-memory error: half, or with a memory model (`predict`: the
    predicted peak in bytes at a per-device batch) the largest divisor of `old` that the model, corrected by how far
    the failed batch overshot it, fits in what the device had. A divisor, so that the accumulation that keeps the
    global batch is a whole number."""
    if predict is None or peak_gib <= 0:
        return max(old // 2, 1)
    reached = peak_gib * 2**30
    factor = max(reached / predict(old), 1.0)
    for b in range(old // 2, 0, -1):
        if old % b == 0 and predict(b) * factor <= reached:
            return b
    return 1
