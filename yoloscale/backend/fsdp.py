"""FSDP2 for Ultralytics models: the YOLO-aware wrap policy and Accelerate's plugin.

Wrap policy: one FSDP unit per layer of `model.model` (a Conv, C3k2, SPPF, C2PSA, Detect, ...), then the root.
Accelerate's size-based policy tries `fully_shard` on the ModuleLists inside C3k2 and fails; its class-based policy
would also shard every Conv nested inside a block (hundreds of tiny all-gathers). The layers of `model.model` are
the natural unit: each runs once per forward, in order, so FSDP2 prefetches the next one's parameters while the
current one computes.

Precision: parameters stay fp32 in FSDP (no `param_dtype`) and Accelerate's autocast computes in bf16/fp16, exactly
as under DDP. FSDP2's own mixed precision would cast BatchNorm's parameters too (pytorch/torchtitan#674); with
autocast BatchNorm runs in fp32 and the numbers match DDP's. The price, all-gathering fp32 instead of bf16 shards,
is small for YOLO: yolo11x has 57M parameters and its step time is dominated by activations.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from yoloscale.config import TrainConfig


def shard_model(model: nn.Module, reshard_after_forward: bool = True, offload: bool = False, mesh=None) -> nn.Module:
    """Apply `fully_shard` to each layer of `model.model` that has parameters, then to the whole model (in place).

    Works on any process group (NCCL on GPUs, gloo on the CPU for the tests). Parameters must be contiguous:
    FSDP2 refuses channels_last parameters (only the input batch is made channels_last)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kwargs = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(),
                  offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())  # fmt: skip
    layers = [m for m in model.model if any(True for _ in m.parameters())]
    for i, layer in enumerate(layers):
        # The last layer's backward starts right after its forward: resharding it would only add an all-gather.
        fully_shard(layer, reshard_after_forward=reshard_after_forward and i < len(layers) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)  # the root holds no parameters of its own
    return model


@functools.cache
def allow_fused_sgd() -> bool:
    """Let torch's fused SGD step FSDP2's DTensor parameters; False where that is not possible (foreach SGD then).

    The fused SGD kernel is elementwise like the fused AdamW kernel, which DTensor runs shard by shard, but torch
    (2.11 to 2.14) registers no sharding strategy for it ("aten._fused_sgd_.default does not have a sharding strategy
    registered"). The foreach SGD that FSDP2 + SGD then needs cost 15 ms of DTensor dispatch per step on yolo11x
    (2 x H200 profile, docs/backends.md) and a host sync to skip a non-finite step, which the fused kernel does on
    the device (`found_inf`). We register the strategy the way this torch registers fused Adam's (private APIs,
    hence the fallback): torch 2.14 through `_register_single_dim_pointwise`, torch 2.11 (the GPU machine's; it has
    no such helper, and there FSDP + SGD ran foreach) through `register_op_strategy` with the list-pointwise rule.
    tests/sharded_parity_worker.py checks the fused FSDP2 step against DDP's."""
    ops = (torch.ops.aten._fused_sgd_.default, torch.ops.aten._fused_sgd_.tensor_lr)
    try:
        from torch.distributed.tensor._ops import _pointwise_ops as pointwise
    except ImportError:
        return False
    try:
        if hasattr(pointwise, "_register_single_dim_pointwise"):
            for op in ops:
                pointwise._register_single_dim_pointwise(op)
        else:
            from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
            from torch.distributed.tensor._ops.utils import register_op_strategy

            for op in ops:
                register = register_op_strategy(op, schema_info=RuntimeSchemaInfo(needs_pytree=True))
                register(pointwise.list_pointwise_strategy)
    except (ImportError, AttributeError, TypeError):
        return False
    return True


def fsdp_plugin(cfg: TrainConfig):
    """Accelerate's FSDP2 plugin for a model we shard ourselves (`shard_model`): Accelerate then keeps our units
    and handles the optimizer, gradient clipping and sharded (DCP) checkpoints."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="NO_WRAP",  # shard_model did the wrapping
        reshard_after_forward=cfg.reshard_after_forward,
        cpu_offload=cfg.offload == "params",
        mixed_precision_policy=MixedPrecisionPolicy(),  # fp32 parameters; Accelerate's autocast computes
        state_dict_type="SHARDED_STATE_DICT",  # each rank writes its shard (DCP); reshardable on load
        cpu_ram_efficient_loading=False,
        activation_checkpointing=False,  # ours is BN-safe (grad_ckpt.py)
    )


def clip_grad_norm_offloaded(parameters, max_norm: float, device: torch.device) -> torch.Tensor:
    """FSDP2 with offload=params: clip the gradients (DTensor shards in CPU memory) to `max_norm` and return their
    total norm, on `device`. torch's clip_grad_norm_ all-reduces the norm where the shards are, and NCCL cannot
    communicate from CPU memory ("No backend type associated with device type cpu", 2 x H200, 2026-11-24). Every
    parameter is sharded on dim 0 of the one mesh, so the squared norms of the local shards add up to the whole."""
    import torch.distributed as dist

    grads = [p.grad for p in parameters if p.grad is not None]
    local = [g._local_tensor for g in grads]
    squares = torch.stack([n.float() for n in torch._foreach_norm(local)]).square().sum() if local else torch.zeros(())
    squares = squares.to(device)
    if grads:
        dist.all_reduce(squares, group=grads[0].device_mesh.get_group())
    norm = squares.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # as torch's clip_grads_with_norm_
    torch._foreach_mul_(local, coef.to(local[0].device) if local else coef)
    return norm


class DTensorLayout:
    """Whole matrices from FSDP2's DTensor shards, for ShardedMuSGD (musgd.py): one all-gather per parameter."""

    def whole(self, params: list, local: list[torch.Tensor]) -> list[torch.Tensor]:
        from yoloscale.backend.tensors import full_tensor

        return [full_tensor(u, p) for p, u in zip(params, local)]

    def local(self, params: list, whole: list[torch.Tensor]) -> list[torch.Tensor]:
        from yoloscale.backend.tensors import shard_like

        return [shard_like(w, p) for p, w in zip(params, whole)]
