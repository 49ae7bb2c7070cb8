"""GPU probe: what one host synchronisation after every optimizer step costs the training step (docs/training.md).

usage: python tests/gpu_sync_probe.py OUT.json key=value ...   (a yoloscale configuration, e.g. model=yolo11x.yaml
       imgsz=640 batch=32 data=DATA precision=bf16)
The bare step (`train_step` on a batch kept on the GPU, as `yoloscale bench` measures it) in windows of 8 micro-steps,
alternating: without a sync, as the loop runs, and with `bad_total.item()` after each optimizer step, which is what
reading the skip flag on the host costs. 5 windows of each after 6 warm-up steps; the medians and every window go to
OUT.json.
"""

import json
import statistics
import sys
import time

import torch

from yoloscale.bench import resident_batches
from yoloscale.config import load_config
from yoloscale.trainer import Trainer

WARMUP, WINDOW, ROUNDS = 6, 8, 5


def window(trainer, batch: dict, sync: bool) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(WINDOW):
        if trainer.train_step(dict(batch)) and sync:
            trainer.bad_total.item()
    torch.cuda.synchronize()
    return WINDOW * trainer.cfg.batch / (time.perf_counter() - start)


def main() -> None:
    out, *settings = sys.argv[1:]
    trainer = Trainer(load_config(None, [*settings, "plots=False"]))
    trainer.model.train()
    trainer.train_loader.sampler.set_epoch(0)
    batch = trainer.prepare_batch(next(iter(trainer.train_loader)))
    with resident_batches(trainer):
        for _ in range(WARMUP):
            trainer.train_step(dict(batch))
        runs = {"no_sync": [], "sync_per_step": []}
        for _ in range(ROUNDS):
            runs["no_sync"].append(window(trainer, batch, False))
            runs["sync_per_step"].append(window(trainer, batch, True))
    medians = {k: statistics.median(v) for k, v in runs.items()}
    result = {"settings": settings, "accumulate": trainer.accumulate, "img_s": medians, "windows": runs,
              "ratio": medians["sync_per_step"] / medians["no_sync"]}  # fmt: skip
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("settings", "accumulate", "img_s", "ratio")}))


if __name__ == "__main__":
    main()
