"""`yoloscale plan`: the table of options before a run.

    yoloscale plan [config.yaml] [key=value ...] [gpu_memory=80GiB] [gpus=8] [backends=ddp,zero2,fsdp]

A plan measures on this machine's first GPU, or on the CPU when there is none (then give gpu_memory=: a CPU plan
estimates what a GPU would hold, see memory/model.py), and prints, for each backend and checkpointing choice, the
largest per-device batch that fits, its predicted peak and img/s; the best choice is marked.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from yoloscale.commands.settings import training_config
from yoloscale.config import TrainConfig, parse_command, setting
from yoloscale.errors import UserError
from yoloscale.memory.grad_ckpt import select_layers
from yoloscale.memory.model import MemoryModel, cache_dir, fmt_gib, parse_memory
from yoloscale.memory.planner import best_selection, classes_of, fit_for, fraction_of, never_fits
from yoloscale.training.data import ultralytics_args
from yoloscale.training.model import build_model, model_spec


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
    ns, cfg_file, overrides = parse_command(PlanSettings, args, "plan")
    cfg = training_config(cfg_file, overrides)
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
        raise UserError(never_fits(fit, 1, limit, cfg))
    best = max(rows, key=lambda r: r["img_s"])
    print(_table(rows, best, fit, cfg, ns, limit, cuda))
    if ns.json:
        rows = [{**r, "best": r is best} for r in rows]
        Path(ns.json).write_text(json.dumps({"device": fit.device, "limit": limit, "rows": rows}, indent=1))
    return rows


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
