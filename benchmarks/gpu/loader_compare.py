"""Our train loader against Ultralytics' (its InfiniteDataLoader from build_dataloader), alone, on the same dataset
object (Ultralytics' YOLODataset and augmentation), batch and workers: img/s of each epoch and the wait for each
epoch's first batch. With MAIN_MS=N the consumer also burns N ms of CPU per batch, as a training loop's host side.

    python benchmarks/gpu/loader_compare.py DATA.yaml IMGSZ BATCH WORKERS [EPOCHS]
"""

from __future__ import annotations

import json
import os
import sys
import time

from ultralytics.data.build import build_dataloader

from yoloscale.config import load_config
from yoloscale.training.data import build_dataset, build_train_loader, check_dataset, ultralytics_args


def epochs_of(loader, epochs: int, batch: int, main_ms: float) -> list[dict]:
    rows = []
    for _ in range(epochs):
        start = time.perf_counter()
        first = None
        n = 0
        for b in loader:
            if first is None:
                first = time.perf_counter() - start
            n += b["img"].shape[0]
            if main_ms:
                end = time.perf_counter() + main_ms / 1e3
                while time.perf_counter() < end:
                    pass
        rows.append({"img_s": n / (time.perf_counter() - start), "first_batch_s": first})
    return rows


def main() -> None:
    data_yaml, imgsz, batch, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    epochs = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    main_ms = float(os.environ.get("MAIN_MS", 0))
    cfg = load_config(None, {"data": data_yaml, "imgsz": imgsz, "batch": batch, "workers": workers, "cache": "ram"})
    data = check_dataset(data_yaml)
    dataset = build_dataset(ultralytics_args(cfg, data_yaml), data, "train", batch, 32)
    result = {}
    for side in os.environ.get("SIDES", "ultralytics,yoloscale").split(","):
        if side == "ultralytics":
            loader = build_dataloader(dataset, batch, workers, shuffle=True, rank=-1)
        else:
            loader = build_train_loader(dataset, cfg, batch, rank=0, world=1, use_cuda=True)
        result[side] = epochs_of(loader, epochs, batch, main_ms)
        del loader
        print(side, json.dumps(result[side]))
    print(json.dumps({"imgsz": imgsz, "batch": batch, "workers": workers, "main_ms": main_ms, **result}))


if __name__ == "__main__":
    main()
