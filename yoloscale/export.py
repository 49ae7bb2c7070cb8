"""Turn EMA weights into files Ultralytics opens: `best.pt` / `last.pt` for `YOLO(path).val() / .predict() /
.export()`, next to the safetensors they come from.

An Ultralytics checkpoint is a pickle of the model object plus `train_args`; we write the EMA model in fp16 with
`epoch=-1` (a finished run, so Ultralytics never tries to resume it), as its own trainer does at the end.
"""

from __future__ import annotations

from copy import deepcopy
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from yoloscale.errors import UserError


def ultralytics_checkpoint(model: torch.nn.Module, args: SimpleNamespace, metrics: dict | None = None) -> dict:
    from ultralytics import __version__

    model = deepcopy(model).half().to(memory_format=torch.contiguous_format)
    model.criterion = None  # training-only state
    for p in model.parameters():
        p.requires_grad_(False)
    return {
        "epoch": -1,
        "best_fitness": (metrics or {}).get("fitness"),
        "model": None,
        "ema": model,
        "updates": None,
        "optimizer": None,
        "train_args": dict(vars(args)),
        "train_metrics": metrics or {},
        "date": datetime.now().astimezone().isoformat(),
        "version": __version__,
        "license": "AGPL-3.0 (https://ultralytics.com/license)",
    }


def write_ultralytics_pt(model: torch.nn.Module, args: SimpleNamespace, path: Path, metrics: dict | None = None) -> Path:
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save(ultralytics_checkpoint(model, args, metrics), tmp)
    tmp.replace(path)
    return path


def pt_from_safetensors(src: Path, dst: Path, model_yaml: str, names: dict, args: SimpleNamespace) -> Path:
    """Rebuild the model from its YAML, load EMA weights saved as safetensors, write an Ultralytics .pt."""
    from yoloscale.model import build_model

    model = build_model(model_yaml, len(names), {int(k): v for k, v in names.items()}, args)
    try:
        model.load_state_dict(load_file(str(src)))
    except Exception as e:
        raise UserError(f"'{src}' does not hold this run's weights: {e}") from None
    return write_ultralytics_pt(model.eval(), args, dst)


def export_run(run: Path) -> list[Path]:
    """`yoloscale export RUN`: write weights/last.pt from the latest checkpoint's EMA (or weights/last.safetensors)
    and weights/best.pt from weights/best.safetensors, without needing the training data."""
    from yoloscale.checkpoint import complete_checkpoints
    from yoloscale.config import load_config
    from yoloscale.data import ultralytics_args
    from yoloscale.run_dir import read_run_info

    run = Path(run)
    info = read_run_info(run)
    cfg = load_config(run / "config.yaml")
    args = ultralytics_args(cfg, info["data"])
    weights = run / "weights"
    weights.mkdir(exist_ok=True)
    sources = {"best": weights / "best.safetensors", "last": weights / "last.safetensors"}
    ckpts = complete_checkpoints(run)
    if ckpts and (ckpts[-1] / "ema.safetensors").is_file():
        sources["last"] = ckpts[-1] / "ema.safetensors"
    written = [pt_from_safetensors(src, weights / f"{kind}.pt", info["model"], info["names"], args)
               for kind, src in sources.items() if src.is_file()]  # fmt: skip
    if not written:
        raise UserError(f"'{run}' has no EMA weights to export (no checkpoint and no weights/*.safetensors).")
    return written
