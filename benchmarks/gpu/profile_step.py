"""Where a training step's GPU time goes: Ultralytics' trainer and ours on the same data, model, batch and AMP, each
profiled with torch.profiler over the same window of micro-batches of its own real loop.

    python benchmarks/gpu/profile_step.py SIDE OUT key=value...    SIDE: ultralytics | yoloscale
        e.g. model=yolo11x.yaml data=DATA.yaml imgsz=640 batch=32 workers=12 cache=ram

Both sides get the same annotations (monkeypatched around Ultralytics' classes, which both trainers call): forward
(BaseModel.predict), loss (v8DetectionLoss.__call__ and its assigner), backward (Tensor.backward), EMA update. The
profiler waits WAIT micro-batches (cuDNN autotuning and the loader's start), then records ACTIVE. Writes OUT/SIDE.json
(per step: wall ms, kernel ms, kernel launches; per annotation: host and device ms; the top kernels by device time)
and OUT/SIDE.txt (torch's table).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

WAIT, WARMUP, ACTIVE = int(os.environ.get("WAIT", 20)), 3, int(os.environ.get("ACTIVE", 10))


class Done(Exception):
    pass


def annotate(owner, attr: str, label: str) -> None:
    original = getattr(owner, attr)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        with record_function(label):
            return original(*args, **kwargs)

    setattr(owner, attr, wrapped)


def annotate_all() -> None:
    from ultralytics.nn.tasks import BaseModel
    from ultralytics.utils import loss, tal
    from ultralytics.utils.torch_utils import ModelEMA

    from yoloscale.training.ema import ShardedEMA

    annotate(BaseModel, "predict", "## forward")
    annotate(loss.v8DetectionLoss, "__call__", "## loss")
    annotate(tal.TaskAlignedAssigner, "forward", "## loss.assigner")
    annotate(torch.Tensor, "backward", "## backward")
    annotate(ModelEMA, "update", "## ema")
    annotate(ShardedEMA, "update", "## ema")


def summarise(prof, side: str, wall: list[float]) -> dict:
    events = prof.key_averages()
    # device events that are spans, not kernels: the profiler's step marks and our annotations' GPU ranges
    kernels = [
        e
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.key.startswith(("ProfilerStep", "## "))
    ]
    kernel_us = sum(e.self_device_time_total for e in kernels)
    launches = sum(e.count for e in kernels)
    notes = {
        e.key: {"host_ms": e.cpu_time_total / 1e3 / ACTIVE, "device_ms": e.device_time_total / 1e3 / ACTIVE}
        for e in events
        if e.key.startswith("## ") or e.key.startswith("Optimizer.")
    }
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:40]
    steps = [b - a for a, b in zip(wall, wall[1:])]
    return {
        "side": side,
        "steps": ACTIVE,
        "wall_ms_per_step": 1e3 * sum(steps) / max(len(steps), 1),
        "kernel_ms_per_step": kernel_us / 1e3 / ACTIVE,
        "kernel_launches_per_step": launches / ACTIVE,
        "annotations": notes,
        "top_kernels": [
            {"name": e.key[:160], "ms_per_step": e.self_device_time_total / 1e3 / ACTIVE, "count": e.count / ACTIVE}
            for e in top
        ],
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def run(side: str, out: Path, settings: dict) -> None:
    annotate_all()
    wall: list[float] = []
    prof = profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
        schedule=schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1),
    )

    def tick() -> None:
        prof.step()
        n = len(wall) + 1
        if n > WAIT + WARMUP and torch.cuda.is_available():
            torch.cuda.synchronize()
        wall.append(time.perf_counter())
        if n >= WAIT + WARMUP + ACTIVE + 1:
            raise Done

    prof.start()
    try:
        if side == "ultralytics":
            from ultralytics import YOLO

            from yoloscale.compat import offline_ultralytics_trainer

            offline_ultralytics_trainer()
            model = YOLO(settings["model"])
            model.add_callback("on_train_batch_end", lambda trainer: tick())
            model.train(
                **{k: v for k, v in settings.items() if k != "model"},
                epochs=1,
                val=False,
                plots=False,
                close_mosaic=0,
                device=0 if torch.cuda.is_available() else "cpu",
                amp=True,
                project=tempfile.mkdtemp(),
                name="ul",
                exist_ok=True,
                verbose=False,
            )
        else:
            from yoloscale.config import load_config
            from yoloscale.training.trainer import Trainer

            cfg = load_config(
                None, {**settings, "epochs": 1, "precision": "fp16", "project": tempfile.mkdtemp(), "name": "ys"}
            )
            trainer = Trainer(cfg)
            trainer.on_micro_step = tick
            trainer.train_epoch()
    except Done:
        pass
    prof.stop()
    wall = wall[WAIT + WARMUP :]
    summary = summarise(prof, side, wall)
    (out / f"{side}.json").write_text(json.dumps(summary, indent=1))
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=90)
    (out / f"{side}.txt").write_text(table)
    print(
        f"{side}: wall {summary['wall_ms_per_step']:.1f} ms/step, kernels {summary['kernel_ms_per_step']:.1f} ms, "
        f"{summary['kernel_launches_per_step']:.0f} launches; "
        + ", ".join(f"{k[3:]} {v['device_ms']:.1f}/{v['host_ms']:.1f}" for k, v in summary["annotations"].items())
    )


if __name__ == "__main__":
    side, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    kv = dict(a.split("=", 1) for a in sys.argv[3:])
    settings = {k: (int(v) if v.isdigit() else v) for k, v in kv.items()}
    run(side, out, settings)
