"""The one place that knows about distributed backends and precision: it builds the Accelerator.

Everything else talks to the returned `Accelerator` only (prepare, backward, clip_grad_norm_, save_state...), so it
never branches on the backend. Rank and world size come from whatever launcher started us (torchrun,
`accelerate launch`, or a single plain process); Accelerate reads them from the environment.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from torch import nn

from yoloscale.config import TrainConfig
from yoloscale.errors import UserError


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
    """'auto' -> bf16 on a CUDA GPU that supports it (no loss scaling to go wrong), fp32 on the CPU (CPU autocast is
    slower than fp32). fp16 may be faster on some GPUs: see docs/benchmarks.md."""
    if cfg.precision == "auto":
        return "bf16" if use_cuda and torch.cuda.is_bf16_supported() else "fp32"
    if cfg.precision == "fp16" and not use_cuda:
        raise UserError("precision=fp16 needs a CUDA GPU (loss scaling is CUDA-only); use bf16 or fp32 on the CPU.")
    return cfg.precision


def build_accelerator(cfg: TrainConfig, accumulate: int):
    """An Accelerator for DDP (or a single device) with our precision and gradient accumulation."""
    from accelerate import Accelerator
    from accelerate.utils import (DistributedDataParallelKwargs, GradientAccumulationPlugin, GradScalerKwargs,
                                  InitProcessGroupKwargs)  # fmt: skip

    use_cuda = torch.cuda.is_available() and not cfg.cpu
    precision = resolve_precision(cfg, use_cuda)
    if use_cuda:
        torch.backends.cudnn.benchmark = True  # training shapes are fixed (imgsz x imgsz): autotune convolutions once
    kwargs = [
        # YOLO uses every parameter in every step. Buffers (BN running stats) are broadcast from rank 0 at each
        # forward, as in Ultralytics' DDP, so every rank's EMA sees the same statistics.
        DistributedDataParallelKwargs(find_unused_parameters=False, gradient_as_bucket_view=True),
        # A dead rank must stop the others, not hang them for NCCL's default 10 minutes x retries.
        InitProcessGroupKwargs(timeout=timedelta(seconds=int(os.environ.get("YOLOSCALE_DIST_TIMEOUT", 1800)))),
        # fp16 only. Ultralytics' loss is summed over the batch, so at torch's default initial scale (2^16) the first
        # steps overflow and are skipped one after another while the scale halves (7 in a row seen for yolo11n on an
        # H100, close to max_bad_steps). Start at 2^10; the scaler still grows it after 2000 clean steps.
        GradScalerKwargs(init_scale=2.0**10),
    ]
    # sync_with_dataloader=False: we count micro-steps ourselves and accumulate across epoch boundaries like
    # Ultralytics; Accelerate skips the DDP all-reduce on every non-final micro-step (no_sync).
    plugin = GradientAccumulationPlugin(num_steps=accumulate, sync_with_dataloader=False)
    return Accelerator(
        cpu=not use_cuda,
        mixed_precision={"fp32": "no"}.get(precision, precision),
        gradient_accumulation_plugin=plugin,
        kwargs_handlers=kwargs,
        step_scheduler_with_optimizer=False,
    )


def prepare_model(accelerator, model: nn.Module, sync_bn: bool) -> nn.Module:
    """SyncBatchNorm (multi-GPU CUDA only), then wrap for the backend."""
    if sync_bn and accelerator.num_processes > 1:
        if accelerator.device.type != "cuda":
            raise UserError("sync_bn=True needs CUDA GPUs (torch's SyncBatchNorm does not run on the CPU).")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
