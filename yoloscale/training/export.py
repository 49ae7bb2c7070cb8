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
from ultralytics import __version__

from yoloscale.checkpoint import save_weights
from yoloscale.checkpoint.folder import io_error


def ultralytics_checkpoint(model: torch.nn.Module, args: SimpleNamespace, metrics: dict | None = None) -> dict:

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


def write_ultralytics_pt(
    model: torch.nn.Module, args: SimpleNamespace, path: Path, metrics: dict | None = None
) -> Path:

    tmp = path.with_name(f".tmp-{path.name}")
    try:
        torch.save(ultralytics_checkpoint(model, args, metrics), tmp)
        tmp.replace(path)
    except Exception as e:  # torch raises RuntimeError on a full disk
        tmp.unlink(missing_ok=True)
        error = io_error(e, path, 2 * sum(p.numel() for p in model.parameters()), what="an Ultralytics .pt")
        if error is None:
            raise
        raise error from None
    return path


class RunWeights:
    """The run directory's weights/ folder, written by the main rank: last.pt after every epoch, best.pt and
    best.safetensors whenever the fitness improves, epoch{N}.pt at each save_period, and at the end
    last.safetensors, last.pt and best.pt (from best.safetensors) once more."""

    def __init__(self, run_dir: Path, args: SimpleNamespace):
        self.folder, self.args = Path(run_dir) / "weights", args

    def epoch_end(self, model: torch.nn.Module, epoch: int, metrics: dict, best: bool, period: bool) -> None:
        """After each epoch, as Ultralytics' trainer: last.pt; best.safetensors and best.pt when the fitness
        improved; the save_period file epoch{N}.pt (N 0-based as there). An interrupted run leaves loadable
        weights."""

        self.folder.mkdir(exist_ok=True)
        write_ultralytics_pt(model, self.args, self.folder / "last.pt", metrics)
        if best:
            save_weights(model.state_dict(), self.folder / "best.safetensors")
            write_ultralytics_pt(model, self.args, self.folder / "best.pt", metrics)
        if period:
            write_ultralytics_pt(model, self.args, self.folder / f"epoch{epoch}.pt", metrics)

    def final(self, model: torch.nn.Module, metrics: dict) -> None:
        """last.* from the model as it is, then best.pt from best.safetensors, loaded into the same model: under
        ZeRO-3 DeepSpeed instruments modules created after its engine, and such a model cannot be pickled ("Can't
        pickle local object 'instrument_w_nvtx.<locals>.wrapped_fn'")."""

        self.folder.mkdir(exist_ok=True)
        save_weights(model.state_dict(), self.folder / "last.safetensors")
        write_ultralytics_pt(model, self.args, self.folder / "last.pt", metrics)
        best = self.folder / "best.safetensors"
        if best.is_file():
            model.load_state_dict(load_file(str(best)))
            write_ultralytics_pt(model, self.args, self.folder / "best.pt")
