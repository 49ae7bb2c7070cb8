"""GPU probe: what host synchronisations cost the training step (docs/training.md).

usage: python benchmarks/gpu/sync_probe.py OUT.json key=value ...   (a yoloscale configuration, e.g. model=yolo11x.yaml
       imgsz=640 batch=32 data=DATA precision=bf16)
The bare step (`train_step` on a batch kept on the GPU, as `yoloscale bench` measures it) in windows of 8 micro-steps,
alternating three ways:
- `no_sync`: as the loop runs. Ultralytics' detection loss still synchronises once per micro-step: its `preprocess`
  sizes the padded targets from `unique(...).max()` of the image indices on the GPU.
- `sync_per_step`: plus `health.total.item()` after each optimizer step (reading the skip flag on the host);
- `loss_without_sync`: the loss's `preprocess` given the largest number of boxes per image from the host (counted
  once here; a loader could count it on the CPU), so the loss does not wait for the forward to finish.
5 windows of each after 6 warm-up steps; the medians and every window go to OUT.json.
"""

import json
import statistics
import sys
import time

import torch

from yoloscale.config import load_config
from yoloscale.speed.step_timing import resident_batches
from yoloscale.training.trainer import Trainer

WARMUP, WINDOW, ROUNDS = 6, 8, 5


def preprocess_sized(criterion, n: int):
    """Ultralytics' v8DetectionLoss.preprocess with the padded size `n` given instead of read from the GPU."""
    from ultralytics.utils.ops import xywh2xyxy

    def preprocess(targets: torch.Tensor, batch_size: int, scale_tensor: torch.Tensor) -> torch.Tensor:
        nl, ne = targets.shape
        batch_idx = targets[:, 0].long()
        out = torch.zeros(batch_size, n, ne - 1, device=criterion.device)
        offsets = torch.zeros(batch_size + 1, dtype=torch.long, device=criterion.device)
        offsets.scatter_add_(0, batch_idx + 1, torch.ones_like(batch_idx))
        within = torch.arange(nl, device=criterion.device) - offsets.cumsum(0)[batch_idx]
        out[batch_idx, within] = targets[:, 1:]
        out[..., 1:5] = xywh2xyxy(out[..., 1:5].mul_(scale_tensor))
        return out

    return preprocess


def window(trainer, batch: dict, sync: bool) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(WINDOW):
        if trainer.train_step(dict(batch)) and sync:
            trainer.health.total.item()
    torch.cuda.synchronize()
    return WINDOW * trainer.batch / (time.perf_counter() - start)


def main() -> None:
    out, *settings = sys.argv[1:]
    trainer = Trainer(load_config(None, [*settings, "plots=False"]))
    trainer.model.train()
    trainer.train_loader.sampler.set_epoch(0)
    batch = trainer.prepare_batch(next(iter(trainer.train_loader)))
    with resident_batches(trainer):
        for _ in range(WARMUP):
            trainer.train_step(dict(batch))
        runs = {"no_sync": [], "sync_per_step": [], "loss_without_sync": []}
        original = trainer.criterion.preprocess
        sized = preprocess_sized(trainer.criterion, int(torch.bincount(batch["batch_idx"].long()).max()))
        for _ in range(ROUNDS):
            runs["no_sync"].append(window(trainer, batch, False))
            runs["sync_per_step"].append(window(trainer, batch, True))
            trainer.criterion.preprocess = sized
            runs["loss_without_sync"].append(window(trainer, batch, False))
            trainer.criterion.preprocess = original
    medians = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "settings": settings,
        "accumulate": trainer.schedule.accumulate,
        "img_s": medians,
        "windows": runs,
        "ratio": {k: v / medians["no_sync"] for k, v in medians.items()},
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("settings", "accumulate", "img_s", "ratio")}))


if __name__ == "__main__":
    main()
