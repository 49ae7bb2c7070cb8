"""`trials_per_gpu=auto`: as many trials side by side on each GPU as fit in its memory by the plan.

One trial's peak is predicted by the memory model (memory/model.py) for the largest trial the search space can sample:
its largest image size and batch, and of several models the one that needs the most. The GPU holds
floor(usable / (peak + a CUDA context)) of them, at most one per two CPU cores and at most MAX_PER_GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from yoloscale.errors import UserError
from yoloscale.memory.grad_ckpt import select_layers
from yoloscale.memory.planner import classes_of, fit_for
from yoloscale.training.data import ultralytics_args
from yoloscale.training.model import build_model, model_spec
from yoloscale.training.run_plan import requested_device_batch

MARGIN = 0.90  # of the GPU's memory the trials may fill together (the allocator's fragmentation, other processes)
CUDA_CONTEXT = 0.6 * 2**30  # each process's CUDA context and cuDNN/cuBLAS handles (not in the allocator's peak)
MAX_PER_GPU = 8
CORES_PER_TRIAL = 2  # the main process and at least one loader worker


def trials_that_fit(peak: float, gpu_memory: float, gpus: int, cores: int) -> int:
    """How many trials of predicted `peak` bytes each fit on one GPU of `gpu_memory` bytes, with the cores of
    the node shared by `gpus` GPUs' trials."""
    by_memory = int(gpu_memory * MARGIN // (peak + CUDA_CONTEXT))
    by_cores = max(cores // (CORES_PER_TRIAL * max(gpus, 1)), 1)
    return max(min(by_memory, by_cores, MAX_PER_GPU), 1)


def largest_trial(base, distributions: dict[str, Any]) -> list:
    """The configurations whose peak bounds every trial's: the space's largest imgsz and batch, each model."""
    # optuna is imported where a sweep uses it: the trainer imports sweep/trial.py, and a plain run never loads it
    from optuna.distributions import CategoricalDistribution

    def values(key: str) -> list:
        d = distributions.get(key)
        if d is None:
            return [getattr(base, key)]
        return list(d.choices) if isinstance(d, CategoricalDistribution) else [d.high]

    largest = {key: max(values(key)) for key in ("imgsz", "batch")}
    return [dataclasses.replace(base, model=model, **largest) for model in values("model")]


def auto_trials_per_gpu(base, distributions: dict[str, Any], devices: list[str], gpus_per_trial: int, cores: int):
    """(trials per GPU, the line that says why) for trials_per_gpu=auto."""
    if not devices:
        return 1, "trials_per_gpu=auto: 1 (no GPU: trials share the CPU's cores)"
    if base.batch < 1 and not base.device_batch:  # auto, a fraction, -1: each trial fills the GPU by itself
        return 1, "trials_per_gpu=auto: 1 (batch=auto gives each trial the GPU's memory)"
    if gpus_per_trial > 1:
        return 1, "trials_per_gpu=auto: 1 (a trial of several GPUs)"
    peak, total, name = max(predicted_peak(cfg) for cfg in largest_trial(base, distributions))
    n = trials_that_fit(peak, total, len(devices), cores)
    return n, (
        f"trials_per_gpu=auto: {n} per GPU ({name}: a trial's predicted peak {peak / 2**30:.1f} GiB with "
        f"{CUDA_CONTEXT / 2**30:.1f} GiB for its CUDA context, {MARGIN:.0%} of {total / 2**30:.1f} GiB usable, "
        f"at most {MAX_PER_GPU}, {CORES_PER_TRIAL} cores each)"
    )


def predicted_peak(cfg) -> tuple[float, float, str]:
    """(the peak of one trial of `cfg` on the first visible GPU, that GPU's memory, the model) from the memory
    model, measured there (or cached)."""

    if not torch.cuda.is_available():
        raise UserError("sweep: trials_per_gpu=auto plans on a GPU, and CUDA does not work here.")
    device = torch.device("cuda", 0)
    nc = classes_of(cfg)
    spec = model_spec(cfg.model, cfg.trust_pickle)
    model = build_model(
        spec, nc, {i: str(i) for i in range(nc)}, ultralytics_args(cfg, cfg.data), trust_pickle=cfg.trust_pickle
    )
    precision = {"auto": "fp16"}.get(cfg.precision, cfg.precision)
    fit = fit_for(cfg, spec, model, device, precision, nc, cfg.imgsz)
    layers = [] if cfg.grad_ckpt == "auto" else select_layers(model, cfg.grad_ckpt)
    batch = requested_device_batch(cfg, 1)
    peak = fit.peak(batch, cfg.imgsz, layers, cfg.backend, 1, cfg.offload)
    return peak, float(torch.cuda.get_device_properties(device).total_memory), cfg.model
