"""The one place that knows about distributed backends and precision.

`backend=ddp|fsdp|zero1|zero2|zero3` becomes an Accelerator here (with Accelerate's FSDP2 or DeepSpeed plugin built
from our configuration: fsdp.py, deepspeed.py). The trainer then calls the four functions below and never branches
on the backend: `build_accelerator`, `wrap_model` (SyncBN, FSDP2 sharding), `prepare`, `optimizer_step`. Rank and
world size come from whatever launcher started us (torchrun, `accelerate launch`, `deepspeed`, Slurm's srun, or a
single plain process). tensors.py gives the sharded EMA each rank's piece of every tensor; full_state.py (with
zero_reshard.py) resumes a checkpoint on another backend, or a ZeRO checkpoint on another number of processes.
"""

from __future__ import annotations

import contextlib
import math
import os
from datetime import timedelta

import torch
from torch import nn

from yoloscale.config import TrainConfig
from yoloscale.errors import UserError

# fp16 only. Ultralytics' loss is summed over the batch, so at torch's default initial scale (2^16) the first steps
# overflow and are skipped one after another while the scale halves (7 in a row seen for yolo11n on an H100, close to
# max_bad_steps). Start at 2^10; the scale still grows after 2000 clean steps. DDP/FSDP2 (GradScaler) and DeepSpeed.
FP16_INIT_SCALE = 2.0**10


def distributed_env_from_slurm(env: dict | None = None) -> None:
    """Inside an `srun` step of several tasks, give torch/Accelerate their variables from Slurm's (one task per
    device): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, and MASTER_ADDR/PORT (first node, port from the job id)
    unless already set. Does nothing under torchrun/accelerate/deepspeed (they set RANK) or outside Slurm."""
    env = os.environ if env is None else env
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["LOCAL_WORLD_SIZE"] = env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
    if "MASTER_ADDR" not in env:
        import subprocess

        hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True,
                               text=True, check=True).stdout.split()  # fmt: skip
        env["MASTER_ADDR"] = hosts[0]
    env.setdefault("MASTER_PORT", str(20000 + int(env["SLURM_JOB_ID"]) % 20000))


def resolve_precision(cfg: TrainConfig, use_cuda: bool) -> str:
    """'auto' -> fp16 with dynamic loss scaling on a CUDA GPU (Ultralytics' AMP default, and the fastest setting
    measured: docs/benchmarks.md), bf16 where this backend cannot scale an fp16 loss (FSDP2 with offload=params),
    fp32 on the CPU (CPU autocast is slower than fp32)."""
    if cfg.precision == "auto":
        if not use_cuda:
            return "fp32"
        return "bf16" if cfg.backend == "fsdp" and cfg.offload == "params" else "fp16"
    if cfg.precision == "fp16" and not use_cuda:
        raise UserError("precision=fp16 needs a CUDA GPU (loss scaling is CUDA-only); use bf16 or fp32 on the CPU.")
    return cfg.precision


def check_launcher_agreement(cfg: TrainConfig, env: dict | None = None) -> None:
    """`accelerate launch --config_file X` exports its choices as environment variables, and Accelerate would quietly
    build an FSDP or DeepSpeed plugin from them. Our configuration is the source of truth: refuse a disagreement."""
    env = os.environ if env is None else env
    flag = lambda name: env.get(name, "false").lower() in ("1", "true")  # noqa: E731
    launcher = "fsdp" if flag("ACCELERATE_USE_FSDP") else "deepspeed" if flag("ACCELERATE_USE_DEEPSPEED") else None
    ours = "deepspeed" if cfg.backend.startswith("zero") else cfg.backend
    if launcher and launcher != ours:
        raise UserError(f"the launcher's Accelerate configuration selects {launcher} (ACCELERATE_USE_"
                        f"{launcher.upper()}=true) but our configuration says backend={cfg.backend}; pass "
                        f"backend=... to match, or launch with launch/accelerate/{cfg.backend}.yaml.")  # fmt: skip
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if launcher == "deepspeed" and stage and f"zero{stage}" != cfg.backend:
        raise UserError(f"the launcher's Accelerate configuration selects ZeRO stage {stage} "
                        f"(ACCELERATE_DEEPSPEED_ZERO_STAGE) but our configuration says backend={cfg.backend}.")
    if launcher == "fsdp" and env.get("FSDP_VERSION", "2") != "2":
        raise UserError(f"the launcher's Accelerate configuration selects FSDP version {env['FSDP_VERSION']}; "
                        "yoloscale runs FSDP2 (fsdp_version: 2).")
    mixed = env.get("ACCELERATE_MIXED_PRECISION", "no")  # "no" is accelerate launch's default: not a choice
    if mixed != "no" and cfg.precision not in ("auto", mixed):
        raise UserError(f"the launcher's Accelerate configuration sets mixed_precision={mixed} "
                        f"(ACCELERATE_MIXED_PRECISION) but our configuration says precision={cfg.precision}.")


def build_accelerator(cfg: TrainConfig, device_batch: int):
    """An Accelerator for the configured backend and precision. Accumulation is ours (`micro_step`): Accelerate and
    DeepSpeed see one micro-step per step, and we tell them which micro-steps end an accumulation window."""
    from accelerate import Accelerator
    from accelerate.utils import (DistributedDataParallelKwargs, GradientAccumulationPlugin, GradScalerKwargs,
                                  InitProcessGroupKwargs)  # fmt: skip

    check_launcher_agreement(cfg)
    use_cuda = torch.cuda.is_available() and not cfg.cpu
    precision = resolve_precision(cfg, use_cuda)
    if cfg.backend != "ddp" and not use_cuda:
        raise UserError(f"backend={cfg.backend} needs CUDA GPUs (Accelerate runs FSDP and DeepSpeed on GPUs only); "
                        "use backend=ddp on the CPU.")
    kwargs = [
        # YOLO uses every parameter in every step. Buffers (BN running stats) are broadcast from rank 0 at each
        # forward, as in Ultralytics' DDP, so every rank's EMA sees the same statistics.
        DistributedDataParallelKwargs(find_unused_parameters=False, gradient_as_bucket_view=True),
        # A dead rank must stop the others, not hang them for NCCL's default 10 minutes x retries.
        InitProcessGroupKwargs(timeout=timedelta(seconds=int(os.environ.get("YOLOSCALE_DIST_TIMEOUT", 1800)))),
        GradScalerKwargs(init_scale=FP16_INIT_SCALE),
    ]
    plugins = {}
    if cfg.backend == "fsdp":
        from yoloscale.backend.fsdp import fsdp_plugin

        plugins["fsdp_plugin"] = fsdp_plugin(cfg)
    elif cfg.backend.startswith("zero"):
        from yoloscale.backend.deepspeed import deepspeed_plugin

        world = int(os.environ.get("WORLD_SIZE", "1"))
        plugins["deepspeed_plugin"] = deepspeed_plugin(cfg, precision, device_batch, world)
        precision = "fp32"  # for Accelerate: DeepSpeed's torch_autocast section does the mixed precision
    # num_steps=1: Accelerate neither divides the loss nor counts micro-steps; `micro_step` says which micro-steps end
    # an accumulation window (Ultralytics' warmup changes their number as it goes).
    plugin = GradientAccumulationPlugin(num_steps=1, sync_with_dataloader=False)
    acc = Accelerator(
        cpu=not use_cuda,
        mixed_precision={"fp32": "no"}.get(precision, precision),
        gradient_accumulation_plugin=plugin,
        kwargs_handlers=kwargs,
        step_scheduler_with_optimizer=False,
        **plugins,
    )
    acc.yoloscale_precision = resolve_precision(cfg, use_cuda)  # what the run computes in, for the log
    return acc


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP's or DeepSpeed's wrapper (FSDP2 shards the model in place). Not Accelerate's
    unwrap_model: it imports DeepSpeed to check for an engine, a second or more of a DDP run's start-up."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def micro_step(accelerator, model: nn.Module, sync: bool):
    """One forward/backward. `sync=False`: gradients accumulate locally (DDP/FSDP2 skip their reduction, DeepSpeed
    is told this is not an accumulation boundary); `sync=True`: they are reduced, and DeepSpeed steps in backward."""
    accelerator.sync_gradients = sync  # read by Accelerate's optimizer wrapper and its DeepSpeed backward
    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
        yield


def wrap_model(accelerator, cfg: TrainConfig, model: nn.Module) -> nn.Module:
    """Before the optimizer is built: SyncBatchNorm (multi-GPU CUDA only); FSDP2 sharding with our wrap policy;
    ZeRO-3's gather units (the same layers)."""
    if cfg.sync_bn and accelerator.num_processes > 1:
        if accelerator.device.type != "cuda":
            raise UserError("sync_bn=True needs CUDA GPUs (torch's SyncBatchNorm does not run on the CPU).")
        if cfg.backend == "zero3":
            raise UserError("sync_bn=True is not supported with backend=zero3 (ZeRO-3 partitions the BatchNorm "
                            "parameters that SyncBatchNorm reads outside DeepSpeed's hooks); use zero2 or fsdp.")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.backend == "fsdp":
        from yoloscale.backend.fsdp import shard_model

        model.to(accelerator.device)
        model = shard_model(model, cfg.reshard_after_forward, offload=cfg.offload == "params")
    if cfg.backend.startswith("zero") and accelerator.yoloscale_precision == "fp16":
        from yoloscale.backend.deepspeed import align_batchnorm_params

        align_batchnorm_params(model)  # cuDNN's fp16 BatchNorm and DeepSpeed's flat buffers
    if cfg.backend == "zero3":
        from yoloscale.backend.deepspeed import gather_whole_layers

        gather_whole_layers(model)  # before the engine registers its hooks
    if cfg.compile:
        # In place (nn.Module.compile): the module, its state-dict keys, the EMA and checkpoints stay as they are;
        # DDP then calls the compiled forward. The eval model is a separate, uncompiled copy.
        model.compile()
    return model


def fused_optimizer(cfg: TrainConfig) -> bool:
    """Fused SGD/AdamW kernels everywhere; FSDP2 + SGD only where fsdp.allow_fused_sgd could enable it on DTensors."""
    from yoloscale.backend.fsdp import allow_fused_sgd

    if cfg.backend == "fsdp" and cfg.offload == "params":
        return False  # the optimizer steps in CPU memory, where the skip flag (a GPU tensor) is not
    return not (cfg.backend == "fsdp" and cfg.optimizer == "SGD") or allow_fused_sgd()


def prepare(accelerator, model: nn.Module, optimizer: torch.optim.Optimizer):
    """Accelerate's prepare; the shard layout for MuSGD on FSDP2/ZeRO; autocast around an FSDP2 model's forward; then
    zero SGD's momentum buffers where our optimizer steps itself (optim.py says why)."""
    from accelerate.utils import get_mixed_precision_context_manager

    from yoloscale.optim import init_momentum_buffers

    from yoloscale.musgd import ShardedMuSGD

    model, optimizer = accelerator.prepare(model, optimizer)
    inner = optimizer.optimizer  # the torch optimizer; under DeepSpeed its ZeRO optimizer, which wraps ours
    if isinstance(getattr(inner, "optimizer", inner), ShardedMuSGD):  # where each rank's pieces of the weights are
        if accelerator.distributed_type == "DEEPSPEED":
            from yoloscale.backend.deepspeed import ZeroLayout

            inner.optimizer.layout = ZeroLayout(inner)
        else:
            from yoloscale.backend.fsdp import DTensorLayout

            inner.layout = DTensorLayout()
    if accelerator.is_fsdp2 and accelerator.native_amp:
        # Accelerate wraps the forward in autocast for DDP, but its FSDP2 path leaves mixed precision to FSDP2's
        # param_dtype, which we do not use (it would cast BatchNorm). Without this, FSDP computed in fp32: 0.59x DDP's
        # img/s and twice its activation memory per image (yolo11x, 2 x H200, 2026-11-23). Same wrapping as DDP's.
        autocast_forward(model, get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler))
    if accelerator.distributed_type == "DEEPSPEED":
        # DeepSpeed's torch_autocast hands the model's bf16 outputs to the loss as they are, so on ZeRO the YOLO loss
        # (BCE, DFL, IoU) was computed in bf16: on the same weights cls_loss came out ~3% off DDP's, both ways across
        # a resume (2 x H200, 2026-11-24, docs/backends.md). The loss gets fp32 outputs, as Accelerate gives DDP's.
        autocast_forward(model.module, autocast=None)
        if accelerator.yoloscale_precision == "fp16":
            from yoloscale.backend.deepspeed import use_dynamic_loss_scaler

            use_dynamic_loss_scaler(model, FP16_INIT_SCALE)
    else:
        init_momentum_buffers(optimizer.optimizer)
    return model, optimizer


def autocast_forward(model: nn.Module, autocast) -> None:
    """Run `model.forward` under `autocast` (a torch.autocast; None: the caller's) and return fp32 outputs, as
    Accelerate does for DDP."""
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32

    forward = model.forward.__func__
    model._original_forward = model.forward  # Accelerate's unwrap_model(keep_fp32_wrapper=False) restores it
    model.forward = MethodType(convert_outputs_to_fp32(autocast(forward) if autocast else forward), model)


def load_state(accelerator, ckpt, saved_backend: str, saved_world: int, backend: str, model, optimizer,
               group_names: list[list[str]]) -> None:  # fmt: skip
    """Restore model, optimizer and RNG states from a checkpoint of any backend and world size: Accelerate's own
    load_state where it can (same backend; ZeRO also the same world size), whole tensors otherwise (full_state.py)."""
    zero_resized = backend.startswith("zero") and saved_world != accelerator.num_processes
    if saved_backend == backend and not zero_resized:
        accelerator.load_state(str(ckpt))
    else:
        from yoloscale.backend.full_state import load_foreign

        load_foreign(accelerator, ckpt, saved_backend, model, optimizer, group_names)


def optimizer_step(accelerator, model: nn.Module, optimizer, max_norm: float) -> torch.Tensor:
    """After the last micro-step's backward: clip, step unless the gradient norm is non-finite, zero the gradients.
    Returns 1.0 (skipped) or 0.0 as a device tensor; no host sync with fused optimizers."""
    if accelerator.distributed_type == "DEEPSPEED":
        # The engine already clipped and stepped inside accelerator.backward; it skips a step with a non-finite
        # gradient norm itself (fp16: an overflow, its loss scale halved) and reports the norm as inf.
        norm = accelerator.deepspeed_engine_wrapped.engine.get_global_grad_norm()  # a tensor or a float
        if norm is None:
            return torch.zeros((), device=accelerator.device)
        return (~torch.isfinite(torch.as_tensor(norm, dtype=torch.float32, device=accelerator.device))).float()
    first = next(model.parameters())
    if hasattr(first, "_local_tensor") and first._local_tensor.device.type != accelerator.device.type:  # offloaded
        from yoloscale.backend.fsdp import clip_grad_norm_offloaded

        accelerator.unscale_gradients()  # fp16: what accelerator.clip_grad_norm_ does first
        norm = clip_grad_norm_offloaded(model.parameters(), max_norm or math.inf, accelerator.device)
    else:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm or math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    bad = (~torch.isfinite(norm)).float()
    inner = optimizer.optimizer
    if inner.defaults.get("fused"):
        # Fused optimizers read `found_inf` and skip the whole update on the device when it is 1. Under fp16 the
        # GradScaler passes its own found_inf (non-finite gradients after unscaling) the same way.
        inner.found_inf = bad
        optimizer.step()
    elif accelerator.scaler is not None or bad.item() == 0:  # the scaler skips by itself; else one host sync
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return bad
