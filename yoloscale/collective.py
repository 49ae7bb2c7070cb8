"""Small collectives every rank calls together."""

from __future__ import annotations

import torch


def any_rank(accelerator, flag: bool) -> bool:
    """Collective: whether `flag` is true on any rank (no communication with one process)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="max").item())
