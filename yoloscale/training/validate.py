"""Validation with Ultralytics' own DetectionValidator, so mAP agrees with `YOLO(best.pt).val()`.

We use the validator's in-training entry point (`validator(trainer=...)`): it takes the model and the device as
given (no reload, no re-fuse), evaluates in fp32 here, and under several processes each rank scores its own
contiguous shard of the val set before the validator gathers the statistics on rank 0. That entry point reads a
handful of trainer attributes; `_TrainerView` provides exactly those.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.data import DataLoader
from ultralytics.models.yolo.detect import DetectionValidator

METRIC_KEYS = {
    "metrics/precision(B)": "precision",
    "metrics/recall(B)": "recall",
    "metrics/mAP50(B)": "mAP50",
    "metrics/mAP50-95(B)": "mAP50-95",
    "fitness": "fitness",
}
# our short name -> the column of results.csv (Ultralytics' name)
RESULT_COLUMNS = {short: column for column, short in METRIC_KEYS.items()}


class _TrainerView(SimpleNamespace):
    """The attributes DetectionValidator reads from a trainer during in-training validation."""

    def label_loss_items(self, loss_items: dict, prefix: str = "val") -> dict:
        return {f"{prefix}/{k}": round(float(v), 5) for k, v in loss_items.items()}


class Validator:
    """Built once per run (it owns the val loader); call it with the (EMA) model after an epoch."""

    def __init__(self, args: SimpleNamespace, data: dict, loader: DataLoader, run_dir: Path, world: int):

        val_args = dict(
            vars(args),
            mode="val",
            plots=False,
            save_json=False,
            save_txt=False,
            verbose=False,
            conf=None,
            half=False,
            batch=loader.batch_size,
        )
        # its plots go where Ultralytics' trainer puts them: the run directory
        self.validator = DetectionValidator(dataloader=loader, save_dir=run_dir, args=val_args)
        self.data, self.world = data, world

    def __call__(
        self,
        model: nn.Module,
        device: torch.device,
        loss_names: tuple[str, ...],
        half: bool = False,
        plots: bool = False,
    ) -> dict[str, float]:
        """mAP50, mAP50-95, precision, recall, fitness (Ultralytics' 0.1 x mAP50 + 0.9 x mAP50-95) and val losses.
        `half`: in fp16, as Ultralytics' trainer validates an AMP run (on a copy: its validator casts the model).
        `plots`: also its plots (confusion matrix, PR/F1/P/R curves, the first batches with labels and predictions);
        the same on every rank (its confusion matrix is reduced over them).

        Collective under several processes; every rank gets the same dict (rank 0's, broadcast).
        """
        was_training = model.training
        target = copy.deepcopy(model) if half else model
        view = _TrainerView(
            device=device,
            data=self.data,
            amp=half,
            world_size=self.world,
            epoch=0,
            epochs=1,
            ema=SimpleNamespace(ema=target),
            stopper=SimpleNamespace(possible_stop=False),
            loss_items={k: torch.zeros((), device=device) for k in loss_names},
        )
        # Validation batches are rectangular, of many shapes: cuDNN autotuning them cost 25-32 s in the first
        # validation of a yolo11x run (its heuristics' choice, ~5 s)
        benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
        self.validator.args.plots = plots  # (the validator turns it off after a call)
        try:
            results = self.validator(trainer=view)
        finally:
            torch.backends.cudnn.benchmark = benchmark
        model.train(was_training)
        if self.world > 1:
            box = [results]
            torch.distributed.broadcast_object_list(box, src=0)
            results = box[0]
        return {METRIC_KEYS.get(k, k.removeprefix("val/")): float(v) for k, v in results.items()}
