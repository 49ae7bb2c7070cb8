"""Choosing a batch and the checkpointed layers from the memory model (plan.py): `batch=auto`, `grad_ckpt=auto` in a
run, and `yoloscale plan`, the table of options before one.

    yoloscale plan [config.yaml] [key=value ...] [gpu_memory=80GiB] [gpus=8] [backends=ddp,zero2,fsdp]

A plan measures on this machine's first GPU, or on the CPU when there is none (then give gpu_memory=: a CPU plan
estimates what a GPU would hold, see plan.py), and prints, for each backend and checkpointing choice, the largest
per-device batch that fits, its predicted peak and img/s; the best choice is marked.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from yoloscale.config import TrainConfig, setting
from yoloscale.errors import UserError
from yoloscale.plan import (
    FRACTION_AUTO,
    FRACTION_ULTRALYTICS,
    MemoryModel,
    cache_dir,
    cache_key,
    cached,
    checkpoint_order,
    device_limit,
    fmt_gib,
    layers_for_batch,
    parse_memory,
    store,
)
from yoloscale.plan_measure import measure


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
    from yoloscale.optim import OptimizerChoice, build_optimizer

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
    local = int(__import__("os").environ.get("LOCAL_WORLD_SIZE", "1"))
    limit = device_limit(device, fraction_of(cfg), local) - reserved
    fit = fit_for(cfg, spec, model, device, precision, nc)
    args = (cfg.imgsz, cfg.backend, world, cfg.offload)
    if cfg.grad_ckpt == "auto" and fixed_batch:
        selection = layers_for_batch(fit, fixed_batch, limit, *args)
        if selection is None:
            raise UserError(_never_fits(fit, fixed_batch, limit, cfg))
        batch = fixed_batch
    elif cfg.grad_ckpt == "auto":
        selection, batch = best_selection(fit, limit, *args, cfg.plan_for)
    else:
        selection = named_selection
        batch = fit.largest_batch(limit, cfg.imgsz, selection, cfg.backend, world, cfg.offload)
    if batch < 1:
        raise UserError(_never_fits(fit, 1, limit, cfg))
    batch, selection = _agree(batch, selection, world)
    return batch, selection, fit, fit.peak(batch, *args[:1], selection, *args[1:])


def _never_fits(fit: MemoryModel, batch: int, limit: float, cfg: TrainConfig) -> str:
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


# --- yoloscale plan ------------------------------------------------------------------------------------------------
@dataclass
class PlanSettings:
    gpu_memory: str = setting(
        "", "Memory of one GPU to plan for (e.g. 80GiB, 141GB); '' = the free memory of this machine's GPU."
    )
    gpus: int = setting(1, "GPUs per run to plan for (the sharded backends divide their state by it).")
    backends: str = setting("ddp,zero1,zero2,fsdp", "Backends to compare (comma list).")
    selections: str = setting(
        "off,highres,all,auto",
        "grad_ckpt choices to compare (comma list; auto: the fastest choice that fits the batch; with batch=auto as plan_for says).",
    )
    measure_imgsz: int = setting(
        0, "Image size to measure at (0: imgsz on a GPU, at most 320 on the CPU); activations scale by pixels."
    )
    json: str = setting("", "Also write the rows to this JSON file (peak in bytes, predicted img/s, the fit's device).")


def run(args: list[str]) -> list[dict]:
    """Entry point of `yoloscale plan`: the table, the best choice marked."""
    from yoloscale.config import load_config, parse_command
    from yoloscale.data import ultralytics_args
    from yoloscale.grad_ckpt import select_layers
    from yoloscale.model import build_model, model_spec

    ns, cfg_file, overrides = parse_command(PlanSettings, args, "plan")
    cfg = load_config(cfg_file, overrides)
    cuda = torch.cuda.is_available() and not cfg.cpu
    if not cuda and not ns.gpu_memory:
        raise UserError("plan: no GPU here; give gpu_memory= (e.g. gpu_memory=80GiB) to plan for one from the CPU.")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    precision = {"auto": "fp16"}.get(cfg.precision, cfg.precision)  # what the GPU will run (auto: fp16)
    nc = classes_of(cfg)
    spec = model_spec(cfg.model, cfg.trust_pickle)
    model = build_model(
        spec, nc, {i: str(i) for i in range(nc)}, ultralytics_args(cfg, cfg.data), trust_pickle=cfg.trust_pickle
    )
    imgsz = ns.measure_imgsz or (cfg.imgsz if cuda else min(cfg.imgsz, 320))
    fit = fit_for(cfg, spec, model, device, precision if cuda else "fp32", nc, imgsz)
    if not cuda:  # planned for a GPU of gpu_memory: its precision, the CPU's intercept replaced by an allowance
        fit.precision, fit.cpu_measured = precision, True
    limit = (parse_memory(ns.gpu_memory) if ns.gpu_memory else torch.cuda.mem_get_info(device)[0]) * fraction_of(cfg)
    rows = []
    for backend in [b for b in ns.backends.split(",") if b]:
        for choice in [s for s in ns.selections.split(",") if s]:
            if choice == "auto":
                selection, batch = best_selection(fit, limit, cfg.imgsz, backend, ns.gpus, cfg.offload, cfg.plan_for)
            else:
                selection = select_layers(model, choice)
                batch = fit.largest_batch(limit, cfg.imgsz, selection, backend, ns.gpus, cfg.offload)
            rows.append(
                {
                    "backend": backend,
                    "grad_ckpt": choice,
                    "layers": selection,
                    "device_batch": batch,
                    "peak": fit.peak(max(batch, 1), cfg.imgsz, selection, backend, ns.gpus, cfg.offload),
                    "img_s": fit.img_s(batch, cfg.imgsz, selection, ns.gpus) if batch else 0.0,
                }
            )
    if not any(r["device_batch"] for r in rows):
        raise UserError(_never_fits(fit, 1, limit, cfg))
    best = max(rows, key=lambda r: r["img_s"])
    print(_table(rows, best, fit, cfg, ns, limit, cuda))
    if ns.json:
        import json

        rows = [{**r, "best": r is best} for r in rows]
        Path(ns.json).write_text(json.dumps({"device": fit.device, "limit": limit, "rows": rows}, indent=1))
    return rows


def classes_of(cfg: TrainConfig) -> int:
    """The classes a run of `cfg` trains (its data's; the synthetic set's 3; 1 with single_cls)."""
    if cfg.single_cls:
        return 1
    if cfg.data == "synthetic":
        return 3
    from yoloscale.data import check_dataset

    return check_dataset(cfg.data)["nc"]


def cache_note(fit: MemoryModel) -> str:
    """Where the memory model came from: measured now, or which cached measurement (and when)."""
    if not fit.cached_from:
        return f"The memory model was measured now (cached for the next plan in {cache_dir()})."
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(Path(fit.cached_from).stat().st_mtime))
    return (
        f"The memory model is a cached measurement from {when} ({fit.cached_from}); delete that file to measure again."
    )


def _table(rows: list[dict], best: dict, fit: MemoryModel, cfg: TrainConfig, ns, limit: float, cuda: bool) -> str:
    where = fit.device if cuda else f"the CPU, for a GPU of {ns.gpu_memory}"
    lines = [
        f"{cfg.model} at imgsz {cfg.imgsz}, {fit.precision}, {ns.gpus} GPU(s); measured on {where}; "
        f"{fmt_gib(limit)} GiB usable per GPU ({fraction_of(cfg):.0%})",
        f"  {'backend':<8}{'grad_ckpt':<11}{'layers':>7}{'batch/GPU':>10}{'peak GiB':>10}{'img/s':>9}",
    ]
    for r in rows:
        mark = "<- best" if r is best else ""
        speed = f"{r['img_s']:>9.1f}" if cuda else f"{'-':>9}"  # the CPU's step times say nothing of a GPU's
        lines.append(
            f"  {r['backend']:<8}{r['grad_ckpt']:<11}{len(r['layers']):>7}{r['device_batch']:>10}"
            f"{fmt_gib(r['peak']):>10}{speed}  {mark}"
        )
    if not cuda:
        lines.append(
            "A CPU plan: activations measured in fp32 on the CPU (halved for fp16/bf16), CUDA's workspaces and "
            "the allocator's fragmentation not measured; trust its batches to about +-25% and confirm on the "
            "GPU (batch=auto measures there). img/s is not predicted: a GPU's step time needs the GPU."
        )
    else:
        off, every = fit.timed[:3], fit.timed[3:]
        lines.append(
            f"img/s: one process's steps (no data loading), from steps timed at per-device batches "
            f"{', '.join(map(str, off))} and, with every layer checkpointed, {', '.join(map(str, every))}."
        )
    lines.append(cache_note(fit))
    return "\n".join(lines)
