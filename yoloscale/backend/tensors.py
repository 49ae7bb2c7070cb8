"""Each rank's own piece of a model tensor, and the full tensor back from the pieces, for every backend.

- DDP, ZeRO-1/2: parameters are whole on every rank; the local piece is the tensor itself.
- FSDP2: parameters are DTensors sharded on dim 0; the local piece is the rank's shard.
- ZeRO-3: a parameter outside the forward is an empty placeholder; the rank's flat partition is `param.ds_tensor`
  (padded to equal sizes across ranks).
Buffers (BatchNorm running statistics) are never sharded.

The sharded EMA keeps only local pieces and gathers full tensors when it validates or saves (ema.py).
With offload (FSDP2 offload=params, ZeRO-3 offload=params) the local pieces live in CPU memory; NCCL cannot gather
them there, so they travel through the GPU (`_for_collective`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this rank holds (a view: updating it updates the model)."""
    if hasattr(t, "ds_tensor"):  # DeepSpeed ZeRO-3 parameter
        return t.ds_tensor.data
    if hasattr(t, "_local_tensor"):  # DTensor (FSDP2)
        return t._local_tensor
    return t.data if isinstance(t, torch.nn.Parameter) else t


def _for_collective(local: torch.Tensor) -> torch.Tensor:
    """`local` on a device the process group can communicate from: an offloaded piece in CPU memory goes to this
    rank's GPU under NCCL ("No backend type associated with device type cpu" with ZeRO-3 offload=params)."""
    if local.device.type == "cpu" and torch.cuda.is_available() and "nccl" in str(dist.get_backend()):
        return local.to(torch.device("cuda", torch.cuda.current_device()), non_blocking=True)
    return local


def full_tensor(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Collective for sharded tensors: the whole tensor `like` describes, assembled from every rank's `local`
    (on the GPU where `local` was offloaded to CPU memory)."""
    if hasattr(like, "ds_tensor") or hasattr(like, "_local_tensor"):
        local = _for_collective(local)
    if hasattr(like, "ds_tensor"):
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)[: like.ds_numel].view(like.ds_shape)
    if hasattr(like, "_local_tensor"):
        return DTensor.from_local(
            local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
        ).full_tensor()
    return local


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `full`, cut the way `like` is sharded (the inverse of `full_tensor`; no communication)."""
    full = full.to(device=local_tensor(like).device, dtype=local_tensor(like).dtype)
    if hasattr(like, "ds_tensor"):
        n, rank = like.ds_tensor.numel(), dist.get_rank()
        flat = torch.nn.functional.pad(full.flatten(), (0, n * dist.get_world_size() - full.numel()))
        return flat[rank * n : (rank + 1) * n].clone()
    if hasattr(like, "_local_tensor"):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local().clone()
    return full.clone()
