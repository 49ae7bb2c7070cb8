"""Choosing a batch and the checkpointed layers from the memory model (model.py): `batch=auto` and `grad_ckpt=auto`
in a run; `yoloscale plan` (commands/plan.py) prints the same choices as a table before one."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from yoloscale.config import FRACTION_AUTO, FRACTION_ULTRALYTICS, TrainConfig
from yoloscale.errors import UserError
from yoloscale.memory.grad_ckpt import select_layers
from yoloscale.memory.measure import measure
from yoloscale.memory.model import (
    MemoryModel,
    cache_key,
    cached,
    checkpoint_order,
    device_limit,
    fmt_gib,
    layers_for_batch,
    store,
)
from yoloscale.training.data import check_dataset
from yoloscale.training.optim import OptimizerChoice, build_optimizer


def fraction_of(cfg: TrainConfig) -> float:
    if 0 < cfg.batch < 1:
        return float(cfg.batch)
    return FRACTION_ULTRALYTICS if cfg.batch == -1 else FRACTION_AUTO


def fit_for(
    cfg: TrainConfig,
    spec,
    model: torch.nn.Module,
    device: torch.device,
    precision: str,
    nc: int,
    imgsz: int | None = None,
) -> MemoryModel:
    """The memory model of this model on this device: from the cache, or measured on a copy of `model`."""

    imgsz = imgsz or cfg.imgsz
    key, name, optimizer = _fit_key(cfg, spec, device, precision, nc, imgsz)
    fit = cached(key)
    if fit is not None:
        return fit
    cuda = device.type == "cuda"  # the trainer's step there: fused optimizer kernels, a channels_last input
    probe = copy.deepcopy(model).to(device)
    opt = build_optimizer(probe, OptimizerChoice(optimizer, 1e-3, 0.9, 0.0), 0.0, fused=cuda)
    try:
        fit = measure(probe, opt, device, precision, imgsz, device_name=name, channels_last=cuda and cfg.channels_last)
    finally:
        del probe, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    store(key, fit)
    return fit


def cached_fit(cfg: TrainConfig, spec, device: torch.device, precision: str, nc: int) -> MemoryModel | None:
    """The memory model a plan or a batch=auto run measured for this model, imgsz, device, precision and optimizer,
    if one is cached; nothing is measured (a fixed-batch run's log compares its peak with it)."""
    return cached(_fit_key(cfg, spec, device, precision, nc, cfg.imgsz)[0])


def _fit_key(cfg: TrainConfig, spec, device: torch.device, precision: str, nc: int, imgsz: int):
    """(cache key, device name, optimizer) of a fit."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # optimizer=auto: AdamW, auto's choice for short runs (MuSGD's state is alike)
    optimizer = cfg.optimizer if cfg.optimizer != "auto" else "AdamW"
    channels_last = device.type == "cuda" and cfg.channels_last
    return cache_key(spec, nc, name, precision, imgsz, optimizer, channels_last), name, optimizer


def best_selection(
    fit: MemoryModel, limit: float, imgsz: int, backend: str, world: int, offload: str, goal: str = "speed"
) -> tuple[list[int], int]:
    """batch=auto with grad_ckpt=auto: among the prefixes of the checkpoint order, the one whose largest fitting
    batch trains fastest (predicted img/s), or with goal='batch' the largest batch (the faster on a tie)."""
    order, best, best_key = checkpoint_order(fit), ([], 0), (0.0, 0.0)
    for n in range(len(order) + 1):
        selection = sorted(order[:n])
        b = fit.largest_batch(limit, imgsz, selection, backend, world, offload)
        speed = fit.img_s(b, imgsz, selection, world) if b else 0.0
        key = (b, speed) if goal == "batch" else (speed, b)
        if b and key > best_key:
            best, best_key = (selection, b), key
    return best


def plan_run(
    cfg: TrainConfig,
    spec,
    model: torch.nn.Module,
    accelerator,
    precision: str,
    nc: int,
    world: int,
    fixed_batch: int,
    named_selection,
    reserved: float = 0.0,
) -> tuple[int, list[int], MemoryModel, float]:
    """For `batch=auto|fraction|-1` and/or `grad_ckpt=auto`: (per-device batch, checkpointed layers, the fit, the
    predicted peak in bytes). Every rank measures its own device; all take the smallest batch and rank 0's layers.
    `reserved`: bytes the run holds beside the model (a distillation teacher), left free."""
    device = accelerator.device
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    limit = device_limit(device, fraction_of(cfg), local) - reserved
    fit = fit_for(cfg, spec, model, device, precision, nc)
    args = (cfg.imgsz, cfg.backend, world, cfg.offload)
    if cfg.grad_ckpt == "auto" and fixed_batch:
        selection = layers_for_batch(fit, fixed_batch, limit, *args)
        if selection is None:
            raise UserError(never_fits(fit, fixed_batch, limit, cfg))
        batch = fixed_batch
    elif cfg.grad_ckpt == "auto":
        selection, batch = best_selection(fit, limit, *args, cfg.plan_for)
    else:
        selection = named_selection
        batch = fit.largest_batch(limit, cfg.imgsz, selection, cfg.backend, world, cfg.offload)
    if batch < 1:
        raise UserError(never_fits(fit, 1, limit, cfg))
    batch, selection = _agree(batch, selection, world)
    return batch, selection, fit, fit.peak(batch, *args[:1], selection, *args[1:])


@dataclass(frozen=True)
class MemoryPlan:
    """What the memory model says for a run: its per-device batch and checkpointed layers (planned for batch=auto or
    grad_ckpt=auto, else as given), the model its real peak is compared with (None without one) and the log's line."""

    device_batch: int
    grad_ckpt: str
    fit: MemoryModel | None
    planned: bool = False  # batch and layers chosen here (config.yaml records them), not given
    note: str = ""


def plan_memory(
    cfg: TrainConfig,
    spec,
    model: torch.nn.Module,
    accelerator,
    precision: str,
    nc: int,
    requested: int,
    reserved: float = 0.0,
) -> MemoryPlan:
    """batch=auto (or a fraction, or -1) and grad_ckpt=auto, from the memory model measured on this device; with a
    batch and layers given, only the cached model (if any) a CUDA run's peak is compared with. `cfg.imgsz`: the size
    to plan for (multi_scale: its largest). `reserved`: bytes the run holds beside the model (a teacher)."""
    device, world = accelerator.device, accelerator.num_processes
    if requested and cfg.grad_ckpt != "auto":
        fit = cached_fit(cfg, spec, device, precision, nc) if device.type == "cuda" else None
        return MemoryPlan(requested, cfg.grad_ckpt, fit)
    named = [] if cfg.grad_ckpt == "auto" else select_layers(model, cfg.grad_ckpt)
    batch, layers, fit, peak = plan_run(cfg, spec, model, accelerator, precision, nc, world, requested, named, reserved)
    if device.type == "cuda":  # the measurement's own steps are not the run's peak
        torch.cuda.reset_peak_memory_stats(device)
    grad_ckpt = ",".join(map(str, layers)) if layers else "off"
    note = (
        f"batch={cfg.batch}: device_batch {batch}, grad_ckpt={grad_ckpt} ({len(layers)} layers); "
        f"predicted peak {peak / 2**30:.1f} GiB on {device}"
    )
    return MemoryPlan(batch, grad_ckpt, fit, planned=True, note=note)


def never_fits(fit: MemoryModel, batch: int, limit: float, cfg: TrainConfig) -> str:
    everything = list(range(len(fit.layers)))
    need = fit.peak(batch, cfg.imgsz, everything, cfg.backend, 1, cfg.offload)
    return (
        f"{cfg.model} at imgsz {cfg.imgsz} does not fit at device_batch {batch} even with every layer "
        f"checkpointed: {fmt_gib(need)} GiB predicted, {fmt_gib(limit)} GiB usable. Try a smaller imgsz, "
        "backend=fsdp (shards the weights), or offload=params."
    )


def _agree(batch: int, selection: list[int], world: int) -> tuple[int, list[int]]:
    if world == 1 or not torch.distributed.is_initialized():
        return batch, selection
    t = torch.tensor(batch, dtype=torch.int64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    box = [selection]
    torch.distributed.broadcast_object_list(box, src=0)
    return int(t.item()), box[0]


def classes_of(cfg: TrainConfig) -> int:
    """The classes a run of `cfg` trains (its data's; the synthetic set's 3; 1 with single_cls)."""
    if cfg.single_cls:
        return 1
    if cfg.data == "synthetic":
        return 3

    return check_dataset(cfg.data)["nc"]
