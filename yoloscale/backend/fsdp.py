"""FSDP2 for Ultralytics models: the backend class, the YOLO-aware wrap policy and Accelerate's plugin.

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

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from yoloscale.backend.base import Backend, autocast_forward
from yoloscale.backend.tensors import full_tensor, shard_like
from yoloscale.compat import mixed_precision_context, register_fused_sgd_for_dtensor
from yoloscale.errors import UserError
from yoloscale.training.musgd import ShardedMuSGD

if TYPE_CHECKING:
    from yoloscale.config import TrainConfig


class FSDP(Backend):
    name = "fsdp"
    accelerate_name = "fsdp"
    layout = "fsdp"
    sharded = True
    sharded_state = (True, True, True)
    replicates_model = False

    def validate(self) -> None:
        cfg = self.cfg
        if cfg.offload == "optimizer":
            raise UserError(
                "offload=optimizer is not available with backend=fsdp: FSDP2 offloads parameters, "
                "gradients and optimizer state together (offload=params), or use backend=zero2 "
                "offload=optimizer."
            )
        if cfg.offload == "params" and cfg.precision == "fp16":
            raise UserError(
                "precision=fp16 with backend=fsdp offload=params is not supported: torch's GradScaler "
                "all-reduces its overflow check where the gradients are, in CPU memory, which NCCL cannot. "
                "Use precision=bf16 with offload, or fp16 without it."
            )
        if cfg.ds_config:
            raise UserError(
                f"ds_config='{cfg.ds_config}' is a DeepSpeed configuration, but backend=fsdp; use backend=zero1/2/3."
            )

    def precision(self, use_cuda: bool) -> str:
        if self.cfg.precision == "auto" and use_cuda and self.cfg.offload == "params":
            return "bf16"  # fp16 cannot be loss-scaled here (validate)
        return super().precision(use_cuda)

    def plugins(self, precision: str, device_batch: int, world: int) -> dict:
        return {"fsdp_plugin": fsdp_plugin(self.cfg)}

    def wrap(self, accelerator, model: nn.Module) -> nn.Module:
        model = super().wrap(accelerator, model)
        model.to(accelerator.device)
        return shard_model(model, self.cfg.reshard_after_forward, offload=self.cfg.offload == "params")

    def enable_fused_optimizer(self) -> bool:
        if self.cfg.offload == "params":
            return False  # the optimizer steps in CPU memory, where the skip flag (a GPU tensor) is not
        return self.cfg.optimizer != "SGD" or enable_fused_sgd()

    def prepare(self, accelerator, model: nn.Module, optimizer: torch.optim.Optimizer):

        model, optimizer = super().prepare(accelerator, model, optimizer)
        if isinstance(optimizer.optimizer, ShardedMuSGD):
            optimizer.optimizer.layout = DTensorLayout()
        if accelerator.native_amp:
            # Accelerate wraps the forward in autocast for DDP, but its FSDP2 path leaves mixed precision to FSDP2's
            # param_dtype, which we do not use (it would cast BatchNorm). Without this, FSDP computed in fp32: 0.59x
            # DDP's img/s and twice its activation memory per image on yolo11x.
            autocast_forward(model, mixed_precision_context(accelerator.native_amp, accelerator.autocast_handler))
        return model, optimizer

    def no_sync(self, model: nn.Module):
        return _gradient_sync_off(model)

    def clip(self, model: nn.Module, max_norm: float, accelerator=None) -> torch.Tensor:
        first = next(model.parameters())
        device = accelerator.device if accelerator is not None else first._local_tensor.device
        if first._local_tensor.device.type != device.type:  # offload=params: the shards are in CPU memory
            return clip_grad_norm_offloaded(model.parameters(), max_norm, device)
        return super().clip(model, max_norm, accelerator)


@contextlib.contextmanager
def _gradient_sync_off(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def shard_model(model: nn.Module, reshard_after_forward: bool = True, offload: bool = False, mesh=None) -> nn.Module:
    """Apply `fully_shard` to each layer of `model.model` that has parameters, then to the whole model (in place).

    Works on any process group (NCCL on GPUs, gloo on the CPU for the tests). Parameters must be contiguous:
    FSDP2 refuses channels_last parameters (only the input batch is made channels_last)."""

    kwargs = dict(
        mesh=mesh, mp_policy=MixedPrecisionPolicy(), offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy()
    )
    layers = [m for m in model.model if any(True for _ in m.parameters())]
    for i, layer in enumerate(layers):
        # The last layer's backward starts right after its forward: resharding it would only add an all-gather.
        fully_shard(layer, reshard_after_forward=reshard_after_forward and i < len(layers) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)  # the root holds no parameters of its own
    return model


def enable_fused_sgd() -> bool:
    """Fused SGD on FSDP2's DTensors (compat.register_fused_sgd_for_dtensor): the foreach SGD that FSDP2 + SGD
    otherwise needs cost 15 ms of DTensor dispatch per step on yolo11x and a host sync to skip a
    non-finite step, which the fused kernel does on the device (`found_inf`). tests/distributed checks the fused
    FSDP2 step against DDP's."""

    return register_fused_sgd_for_dtensor()


def fsdp_plugin(cfg: TrainConfig):
    """Accelerate's FSDP2 plugin for a model we shard ourselves (`shard_model`): Accelerate then keeps our units
    and handles the optimizer, gradient clipping and sharded (DCP) checkpoints."""

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
    communicate from CPU memory ("No backend type associated with device type cpu"). Every
    parameter is sharded on dim 0 of the one mesh, so the squared norms of the local shards add up to the whole."""

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

        return [full_tensor(u, p) for p, u in zip(params, local)]

    def local(self, params: list, whole: list[torch.Tensor]) -> list[torch.Tensor]:

        return [shard_like(w, p) for p, w in zip(params, whole)]
