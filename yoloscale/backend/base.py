"""The interface every backend implements, with the behaviour they share (DDP's, unless a backend says otherwise).

A backend is built from the run's configuration and answers, in the order the trainer asks:
  validate()                     configuration rules of this backend (checked when it is built)
  precision(use_cuda)            what the run computes in
  build_accelerator(batch)       an Accelerator with this backend's plugin
  wrap(accelerator, model)       before the optimizer exists: SyncBN, sharding, ...
  enable_fused_optimizer()       whether torch's fused kernels step it (readying them where needed)
  sharded                        whether the optimizer sees pieces of the parameters
  prepare(accelerator, m, opt)   Accelerate's prepare, then what this backend still needs
  micro_step(model, sync)        one forward/backward, reducing gradients or not
  backward(loss, accelerator)    the backward (DeepSpeed steps inside it)
  step(model, opt, max_norm)     clip and step at the end of an accumulation window; 1.0 if skipped
  layout, load_state(...)        the checkpoint layout it writes, and loading any backend's checkpoint into this run
The micro-step, backward and step methods also work without an Accelerator (accelerator=None), on a model wrapped
by `wrap`, so the distributed tests run this code, not a copy of it.
"""

from __future__ import annotations

import contextlib
import math
import os
from datetime import timedelta
from types import MethodType
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
    GradScalerKwargs,
    InitProcessGroupKwargs,
)
from torch import nn

from yoloscale.backend.full_state import load_foreign
from yoloscale.backend.registry import layout_of
from yoloscale.compat import convert_outputs_to_fp32
from yoloscale.errors import UserError
from yoloscale.training.optim import init_momentum_buffers

if TYPE_CHECKING:
    from yoloscale.config import TrainConfig

# fp16 only. Ultralytics' loss is summed over the batch, so at torch's default initial scale (2^16) the first steps
# overflow and are skipped one after another while the scale halves (7 in a row for yolo11n, close to
# max_bad_steps). Start at 2^10; the scale still grows after 2000 clean steps. DDP/FSDP2 (GradScaler) and DeepSpeed.
FP16_INIT_SCALE = 2.0**10


class Backend:
    name = "ddp"
    accelerate_name: str | None = None  # what `accelerate launch --config_file` calls it (ACCELERATE_USE_*)
    layout = "ddp"  # the checkpoint layout it writes (backend/full_state.py reads every layout)
    sharded = False  # each rank holds pieces of the weights (the optimizer sees pieces)
    sharded_state = (False, False, False)  # whether each rank holds 1/world of the weights, gradients, optimizer state
    replicates_model = True  # every device holds the whole model: what compile_scope=model and distillation need

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.validate()  # a configuration this backend cannot honour is refused before anything is built
        if not self.replicates_model:
            self._refuse_whole_model_options()

    # --- configuration ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Options this backend cannot honour are refused, naming them."""
        if self.cfg.offload != "none":
            raise UserError(f"offload needs a sharded backend (fsdp, zero1, zero2, zero3); got backend={self.name}.")
        if self.cfg.ds_config:
            raise UserError(
                f"ds_config='{self.cfg.ds_config}' is a DeepSpeed configuration, but backend={self.name}; "
                "use backend=zero1/2/3."
            )

    def _refuse_whole_model_options(self) -> None:
        cfg = self.cfg
        if cfg.compile != "off" and cfg.compile_scope == "model":
            raise UserError(
                f"compile_scope=model is supported with backend=ddp and grad_ckpt=off only (got backend={cfg.backend}, "
                f"grad_ckpt={cfg.grad_ckpt}); compile_scope=layers works with both."
            )
        if cfg.distill_model:
            raise UserError(
                f"distill_model= trains with backend=ddp (each device holds the whole teacher), got backend={cfg.backend}."
            )

    def uses_cuda(self) -> bool:
        """Whether the run trains on CUDA GPUs (cpu=True, or a machine without them: the CPU)."""
        return torch.cuda.is_available() and not self.cfg.cpu

    @property
    def precision_name(self) -> str:
        """What the run computes in on this machine: precision= resolved (auto: fp16 on a GPU, fp32 on the CPU)."""
        return self.precision(self.uses_cuda())

    def precision(self, use_cuda: bool) -> str:
        """'auto' -> fp16 with dynamic loss scaling on a CUDA GPU (Ultralytics' AMP default, and the fastest setting
        measured: docs/benchmarks.md), fp32 on the CPU (CPU autocast is slower than fp32)."""
        if self.cfg.precision == "auto":
            return "fp16" if use_cuda else "fp32"
        if self.cfg.precision == "fp16" and not use_cuda:
            raise UserError("precision=fp16 needs a CUDA GPU (loss scaling is CUDA-only); use bf16 or fp32 on the CPU.")
        return self.cfg.precision

    # --- building ----------------------------------------------------------------------------------------------------
    def plugins(self, precision: str, device_batch: int, world: int) -> dict:
        """Accelerator keyword arguments of this backend (its FSDP/DeepSpeed plugin)."""
        return {}

    def accelerate_precision(self, precision: str) -> str:
        """The mixed precision Accelerate applies itself."""
        return precision

    def build_accelerator(self, device_batch: int):
        """An Accelerator for this backend and precision. Accumulation is ours (`micro_step`): Accelerate and
        DeepSpeed see one micro-step per step, and are told which micro-steps end an accumulation window."""

        check_launcher_agreement(self)  # a backend= / accelerate config disagreement is an error
        use_cuda = self.uses_cuda()
        if self.name != "ddp" and not use_cuda:
            raise UserError(
                f"backend={self.name} needs CUDA GPUs (Accelerate runs FSDP and DeepSpeed on GPUs only); "
                "use backend=ddp on the CPU."
            )
        precision = self.precision_name
        kwargs = [
            # YOLO uses every parameter in every step. Buffers (BN running stats) are broadcast from rank 0 at each
            # forward, as in Ultralytics' DDP, so every rank's EMA sees the same statistics.
            DistributedDataParallelKwargs(find_unused_parameters=False, gradient_as_bucket_view=True),
            # A collective that waits longer than a training step can take ends the job (torch's default: 30 min);
            # a frozen rank is found sooner by the heartbeat (liveness.py).
            InitProcessGroupKwargs(timeout=timedelta(seconds=self.cfg.dist_timeout)),
            GradScalerKwargs(init_scale=FP16_INIT_SCALE),
        ]
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return Accelerator(
            cpu=not use_cuda,
            mixed_precision={"fp32": "no"}.get(p := self.accelerate_precision(precision), p),
            # num_steps=1: Accelerate neither divides the loss nor counts micro-steps (Ultralytics' warmup changes
            # their number as it goes)
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1, sync_with_dataloader=False),
            kwargs_handlers=kwargs,
            step_scheduler_with_optimizer=False,
            **self.plugins(precision, device_batch, world),
        )

    def set_device_batch(self, accelerator, device_batch: int, world: int) -> None:
        """The per-device batch chosen after the Accelerator was built (batch=auto); only DeepSpeed needs it."""

    def wrap(self, accelerator, model: nn.Module) -> nn.Module:
        """Before the optimizer is built: SyncBatchNorm (multi-GPU CUDA only)."""
        if self.cfg.sync_bn and accelerator.num_processes > 1:
            if accelerator.device.type != "cuda":
                raise UserError("sync_bn=True needs CUDA GPUs (torch's SyncBatchNorm does not run on the CPU).")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def enable_fused_optimizer(self) -> bool:
        """Whether torch's fused SGD/AdamW kernels step this backend's parameters; a backend whose parameters need an
        op registered in torch for them (FSDP2's DTensors) registers it here."""
        return True

    def prepare(self, accelerator, model: nn.Module, optimizer: torch.optim.Optimizer):
        """Accelerate's prepare, then SGD's momentum buffers zeroed (optim.init_momentum_buffers says why)."""

        model, optimizer = accelerator.prepare(model, optimizer)
        init_momentum_buffers(optimizer.optimizer)
        return model, optimizer

    # --- the step ----------------------------------------------------------------------------------------------------
    def no_sync(self, model: nn.Module):
        """A context in which backward accumulates gradients locally, without reducing them."""
        return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()

    @contextlib.contextmanager
    def micro_step(self, model: nn.Module, sync: bool, accelerator=None):
        """One forward/backward. `sync=False`: gradients accumulate locally; `sync=True`: they are reduced."""
        if accelerator is not None:
            accelerator.sync_gradients = sync  # read by Accelerate's optimizer wrapper (it steps only then)
        with contextlib.nullcontext() if sync else self.no_sync(model):
            yield

    def backward(self, loss: torch.Tensor, model: nn.Module, sync: bool, accelerator=None) -> None:
        if accelerator is not None:
            accelerator.backward(loss)  # fp16: through its GradScaler
        else:
            loss.backward()

    def step(self, model: nn.Module, optimizer, max_norm: float, accelerator=None) -> torch.Tensor:
        """After the last micro-step's backward: clip, step unless the gradient norm is non-finite, zero the
        gradients. Returns 1.0 (skipped) or 0.0 as a device tensor; no host sync with fused optimizers."""
        if accelerator is not None:
            accelerator.unscale_gradients()  # fp16: what accelerator.clip_grad_norm_ does first
        norm = self.clip(model, max_norm or math.inf, accelerator)
        bad = (~torch.isfinite(norm)).float()
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper steps through its GradScaler
        if inner.defaults.get("fused"):
            # Fused optimizers read `found_inf` and skip the whole update on the device when it is 1. Under fp16
            # the GradScaler passes its own found_inf (non-finite gradients after unscaling) the same way.
            inner.found_inf = bad
            optimizer.step()
        elif (accelerator is not None and accelerator.scaler is not None) or bad.item() == 0:  # else: a host sync
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return bad

    def clip(self, model: nn.Module, max_norm: float, accelerator=None) -> torch.Tensor:
        """Clip the gradients to `max_norm`; returns their total norm (a device tensor)."""
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # --- checkpoints --------------------------------------------------------------------------------------------------
    def load_state(
        self, accelerator, ckpt, saved_backend: str, saved_world: int, model, optimizer, group_names: list[list[str]]
    ) -> None:
        """Model, optimizer and RNG states from a checkpoint any backend wrote on any world size: Accelerate's own
        load_state where it can, whole tensors otherwise (full_state.py)."""
        saved_layout = layout_of(saved_backend)
        if saved_layout == self.layout and self.can_load_own(saved_world, accelerator.num_processes):
            accelerator.load_state(str(ckpt))
        else:
            load_foreign(
                accelerator, ckpt, saved_layout, unwrap(model), optimizer, group_names, self.engine(accelerator)
            )

    def can_load_own(self, saved_world: int, world: int) -> bool:
        """Whether Accelerate loads this layout saved on `saved_world` processes into `world` (DDP: always)."""
        return True

    def engine(self, accelerator):
        """DeepSpeed's engine, which owns model and optimizer under ZeRO; None elsewhere."""
        return None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP's or DeepSpeed's wrapper (FSDP2 shards the model in place). Not Accelerate's
    unwrap_model: it imports DeepSpeed to check for an engine, a second or more of a DDP run's start-up."""
    return getattr(model, "module", model)


def check_launcher_agreement(backend: Backend, env: dict | None = None) -> None:
    """`accelerate launch --config_file X` exports its choices as environment variables, and Accelerate would quietly
    build an FSDP or DeepSpeed plugin from them. Our configuration is the source of truth: refuse a disagreement."""
    env = os.environ if env is None else env
    cfg = backend.cfg
    flag = lambda name: env.get(name, "false").lower() in ("1", "true")  # noqa: E731
    launcher = "fsdp" if flag("ACCELERATE_USE_FSDP") else "deepspeed" if flag("ACCELERATE_USE_DEEPSPEED") else None
    if launcher and launcher != backend.accelerate_name:
        raise UserError(
            f"the launcher's Accelerate configuration selects {launcher} (ACCELERATE_USE_"
            f"{launcher.upper()}=true) but our configuration says backend={cfg.backend}; pass "
            f"backend=... to match, or launch with the accelerate/{cfg.backend}.yaml template."
        )
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if launcher == "deepspeed" and stage and f"zero{stage}" != cfg.backend:
        raise UserError(
            f"the launcher's Accelerate configuration selects ZeRO stage {stage} "
            f"(ACCELERATE_DEEPSPEED_ZERO_STAGE) but our configuration says backend={cfg.backend}."
        )
    if launcher == "fsdp" and env.get("FSDP_VERSION", "2") != "2":
        raise UserError(
            f"the launcher's Accelerate configuration selects FSDP version {env['FSDP_VERSION']}; "
            "yoloscale runs FSDP2 (fsdp_version: 2)."
        )
    mixed = env.get("ACCELERATE_MIXED_PRECISION", "no")  # "no" is accelerate launch's default: not a choice
    if mixed != "no" and cfg.precision not in ("auto", mixed):
        raise UserError(
            f"the launcher's Accelerate configuration sets mixed_precision={mixed} "
            f"(ACCELERATE_MIXED_PRECISION) but our configuration says precision={cfg.precision}."
        )


def autocast_forward(model: nn.Module, autocast) -> None:
    """Run `model.forward` under `autocast` (a torch.autocast; None: the caller's) and return fp32 outputs, as
    Accelerate does for DDP."""

    forward = model.forward.__func__
    model._original_forward = model.forward  # Accelerate's unwrap_model(keep_fp32_wrapper=False) restores it
    model.forward = MethodType(convert_outputs_to_fp32(autocast(forward) if autocast else forward), model)
