"""A short real training run on one backend, recording every optimizer step's losses, for gpu_backends.py.

usage: torchrun ... backend_run_worker.py OUT_JSON PROJECT NAME key=value ... [resume=CHECKPOINT]
Two epochs, mosaic off (its image buffer is not checkpointed, docs/backends.md), log_interval=1 (losses read each
step) and every checkpoint kept, so a second process can
resume from the first epoch's end and be compared with the uninterrupted run.
"""

import functools
import json
import sys
import time

import torch

import yoloscale.training.trainer
from yoloscale.checkpoint import save_checkpoint
from yoloscale.config import load_config

out, project, name, *overrides = sys.argv[1:]
cfg = load_config(
    None,
    [
        "data=synthetic",
        "imgsz=320",
        "device_batch=16",
        "nbs=16",
        "accumulate=1",
        "optimizer=SGD",
        "workers=0",
        "epochs=2",
        "close_mosaic=0",
        "mosaic=0",
        "val=False",
        "log_interval=1",
        "plots=False",
        f"project={project}",
        f"name={name}",
        *overrides,
    ],
)
yoloscale.training.trainer.save_checkpoint = functools.partial(save_checkpoint, keep=10)
trainer = yoloscale.training.trainer.Trainer(cfg)
# Deterministic convolutions (the trainer turns autotuning on): with cuDNN's autotuned, non-deterministic kernels the
# curves of identical runs parted after 2-3 steps (fsdp resumed vs uninterrupted: 1.25e-1 by step 8, 2026-11-24),
# which hid real differences in the noise. Upsampling's backward still uses atomics, so not every bit repeats.
torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
steps: list[dict] = []
log_step = trainer.log.step
trainer.log.step = lambda values, step: (steps.append(dict(values)), log_step(values, step))
start = time.perf_counter()
metrics = trainer.train()
if trainer.is_main:
    json.dump(
        {
            "steps": steps,
            "metrics": metrics,
            "seconds": time.perf_counter() - start,
            "peak_GiB": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
            "skipped_steps": trainer.health.skipped(),
            "devices": trainer.world,
            "run_dir": str(trainer.run_dir),
        },
        open(out, "w"),
        indent=1,
    )
