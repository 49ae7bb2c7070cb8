"""Throughput and peak memory of `yoloscale train`'s loop beside Ultralytics' own trainer, same GPU, same data.

    python benchmarks/core_gpu.py --out OUT [--model yolo11x.yaml --imgsz 640 --batch 32 --images 2048 --workers 12]

Measures, each in its own process (fresh CUDA memory statistics), on a synthetic set written first:
  * ultralytics: `YOLO(model).train(...)`, its default AMP (fp16 + GradScaler), cache=ram. Its online AMP check
    (which downloads weights) is replaced by `True`, the answer it gives on a healthy GPU.
  * yoloscale-<precision>: the Trainer's loader + `train_step()`, as `train_epoch()` runs them.
  * bare-<precision>: the same `train_step()` on one batch kept on the GPU (the step's ceiling, no data loading).
Steady state: the first `--warmup` micro-batches are dropped; img/s is the median over windows of `--window`
micro-batches (each window ends with a CUDA synchronisation). Peak memory is torch's max reserved.
Prints a table and writes OUT/core_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _windows(times: list[float], images_per_step: int, warmup: int, window: int) -> dict:
    """times[i] = clock after micro-step i (synchronised at window ends only)."""
    marks = times[warmup::window]
    rates = [window * images_per_step / (b - a) for a, b in zip(marks, marks[1:])]
    return {"img_s": statistics.median(rates), "img_s_windows": rates}


def run_ultralytics(a) -> dict:
    import torch
    import ultralytics.engine.trainer as ul_trainer
    from ultralytics import YOLO

    ul_trainer.check_amp = lambda model: True  # offline: its check would try to download yolo26n.pt
    times: list[float] = []

    def on_batch_end(trainer):  # its loop reads the losses on the host every batch, so this is synchronised
        times.append(time.perf_counter())

    model = YOLO(a.model)
    model.add_callback("on_train_batch_end", on_batch_end)
    model.train(data=str(a.data), imgsz=a.imgsz, batch=a.batch, epochs=1, workers=a.workers, cache="ram", val=False,
                close_mosaic=0,  # keep mosaic on, as in steady-state training (epochs=1 would close it)
                plots=False, device=0 if torch.cuda.is_available() else "cpu", project=str(a.out), name="ultralytics", exist_ok=True, amp=True, verbose=False)
    peak = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else float("nan")
    return {**_windows(times, a.batch, a.warmup, a.window), "peak_GiB": peak, "steps": len(times)}


def run_yoloscale(a, precision: str) -> dict:
    import torch

    from yoloscale.config import load_config
    from yoloscale.trainer import Trainer

    cfg = load_config(None, [f"model={a.model}", f"data={a.data}", f"imgsz={a.imgsz}", f"batch={a.batch}",
                             f"workers={a.workers}", "cache=ram", f"precision={precision}", "epochs=1", "val=False",
                             f"project={a.out}", f"name=yoloscale-{precision}", "close_mosaic=0", "plots=False"])
    trainer = Trainer(cfg)
    trainer.model.train()
    trainer.train_loader.sampler.set_epoch(0)
    times, batch = [], None
    for i, batch in enumerate(trainer.train_loader):
        trainer.train_step(batch)
        if (i - a.warmup) % a.window == 0 or i < a.warmup:
            _sync()
        times.append(time.perf_counter())
    peak = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else float("nan")
    loop = {**_windows(times, a.batch, a.warmup, a.window), "peak_GiB": peak}
    # The ceiling: the same step on one batch that stays on the GPU.
    resident = trainer._to_device(batch)  # once: no host-to-device copy or uint8->float in the timed steps
    resident_img = resident["img"]
    times = []
    for i in range(a.warmup + 5 * a.window + 1):
        resident["img"] = resident_img
        _step_on_device(trainer, resident)
        if (i - a.warmup) % a.window == 0 or i < a.warmup:
            _sync()
        times.append(time.perf_counter())
    bare = _windows(times, a.batch, a.warmup, a.window)
    return {"loop": loop, "bare": bare, "accumulate": trainer.accumulate, "skipped_steps": int(trainer.bad_total.item())}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _step_on_device(trainer, batch: dict) -> None:
    """train_step() minus its host-to-device preparation (the batch is already on the GPU)."""
    to_device = trainer._to_device
    trainer._to_device = lambda b: b
    try:
        trainer.train_step(batch)
    finally:
        trainer._to_device = to_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="yolo11x.yaml")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--warmup", type=int, default=14)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--precisions", default="bf16,fp16")
    p.add_argument("--only", help=argparse.SUPPRESS)  # internal: run one measurement in this process
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    a.out.mkdir(parents=True, exist_ok=True)
    if a.only:
        result = run_ultralytics(a) if a.only == "ultralytics" else run_yoloscale(a, a.only)
        (a.out / f"{a.only}.json").write_text(json.dumps(result))
        return

    from yoloscale.synth import write_synthetic_dataset

    t = time.time()
    a.data = write_synthetic_dataset(a.out / "data", n_train=a.images, n_val=32, size=a.imgsz)
    print(f"synthetic data: {a.images} images at {a.imgsz} px in {time.time() - t:.0f}s", flush=True)
    results = {}
    for only in ["ultralytics", *a.precisions.split(",")]:
        cmd = [sys.executable, __file__, "--only", only, "--data", str(a.data)] + sys.argv[1:]
        t = time.time()
        proc = subprocess.run(cmd, stdout=open(a.out / f"{only}.log", "w"), stderr=subprocess.STDOUT)
        print(f"{only}: exit {proc.returncode} in {time.time() - t:.0f}s", flush=True)
        if proc.returncode == 0:
            results[only] = json.loads((a.out / f"{only}.json").read_text())
    import torch

    summary = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "model": a.model, "imgsz": a.imgsz,
               "batch": a.batch, "images": a.images, "workers": a.workers, "date": time.strftime("%Y-%m-%d"),
               "results": results}
    (a.out / "core_gpu.json").write_text(json.dumps(summary, indent=1))
    ul = results.get("ultralytics", {}).get("img_s")
    print(f"\n{summary['gpu']}, {a.model}, imgsz {a.imgsz}, batch {a.batch}")
    print(f"{'what':<28}{'img/s':>8}{'peak GiB':>10}{'x Ultralytics':>15}")
    rows = [("ultralytics (fp16 AMP)", results.get("ultralytics", {}))]
    for prec in a.precisions.split(","):
        r = results.get(prec, {})
        rows += [(f"yoloscale loop {prec}", r.get("loop", {})), (f"bare step {prec}", r.get("bare", {}))]
    for name, r in rows:
        if r:
            ratio = f"{r['img_s'] / ul:.2f}" if ul else "-"
            print(f"{name:<28}{r['img_s']:>8.1f}{r.get('peak_GiB', float('nan')):>10.1f}{ratio:>15}")


if __name__ == "__main__":
    main()
