"""Small collectives every rank calls together."""

from __future__ import annotations

import torch


def any_rank(accelerator, flag: bool) -> bool:
    """Collective: whether `flag` is true on any rank (no communication with one process)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="max").item())


def largest_on_any_rank(accelerator, value: float) -> float:
    """Collective: the largest of the ranks' values (one decision for all)."""
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(torch.tensor(value, device=accelerator.device), reduction="max").item()
