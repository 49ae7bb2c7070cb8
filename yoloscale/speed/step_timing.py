"""What `yoloscale bench` measures inside one process: steady img/s over windows of micro-batches, our loop (the
Trainer's own train_epoch) and its bare step on a batch kept on the device, the data loader alone, Ultralytics' own
trainer, a matmul's peak TFLOP/s; and the arithmetic of MFU and scaling efficiency. The method is in
commands/bench.py's docstring, which bench.json records."""

from __future__ import annotations

import copy
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from ultralytics import YOLO
from ultralytics.utils.torch_utils import get_flops

from yoloscale.compat import offline_ultralytics_trainer
from yoloscale.errors import UserError
from yoloscale.training.data import build_dataset, build_train_loader, check_dataset, ultralytics_args
from yoloscale.training.trainer import Trainer


# --- arithmetic ------------------------------------------------------------------------------------
def steady_img_s(times: list[float], images_per_step: int, warmup: int, window: int) -> dict:
    """times[i]: clock after micro-step i. Median img/s over whole windows after the warm-up."""
    marks = times[warmup::window]
    rates = [window * images_per_step / (b - a) for a, b in zip(marks, marks[1:])]
    if not rates:
        raise UserError(f"bench: {len(times)} steps are too few for warmup={warmup} and window={window}.")
    return {"img_s": statistics.median(rates), "windows": rates}


def mfu(img_s: float, forward_gflops: float, peak_tflops: float, devices: int) -> float:
    """Model FLOPs utilisation: training counted as 3 x the forward pass."""
    return img_s * 3 * forward_gflops * 1e9 / (devices * peak_tflops * 1e12)


def scaling_efficiency(img_s_n: float, img_s_1: float, n: int) -> float:
    return img_s_n / (n * img_s_1)


# --- measurements (each runs in its own process) ------------------------------------------------------------------
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak_tflops() -> dict:
    cuda = torch.cuda.is_available()
    n, dtype, device = (8192, torch.bfloat16, "cuda") if cuda else (2048, torch.float32, "cpu")
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    _sync()
    reps, t = 10 if cuda else 3, time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync()
    return {"tflops": 2 * n**3 * reps / (time.perf_counter() - t) / 1e12, "how": f"{n}^3 {dtype} matmul on {device}"}


def peak_memory() -> dict:
    """Peak GPU memory since the last reset: reserved (what the process holds, what decides whether it fits) and
    allocated (what tensors used; a large gap means fragmentation of the caching allocator)."""
    if not torch.cuda.is_available():
        return {"peak_GiB": None, "peak_alloc_GiB": None}
    gib = 2**30
    return {
        "peak_GiB": torch.cuda.max_memory_reserved() / gib,
        "peak_alloc_GiB": torch.cuda.max_memory_allocated() / gib,
    }


@contextmanager
def resident_batches(trainer):
    """Inside: `trainer.train_step` takes batches already prepared on the device (no host-to-device copy, no
    uint8 -> float conversion, which would otherwise be applied a second time)."""
    prepare, trainer.prepare_batch = trainer.prepare_batch, lambda b: b
    try:
        yield
    finally:
        trainer.prepare_batch = prepare


def measure_bare(trainer, resident: dict, warmup: int, window: int) -> dict:
    """The step ceiling: `train_step` on a batch already on the device (no loader, no host-to-device copy)."""
    times = []
    with resident_batches(trainer):
        for i in range(warmup + 3 * window + 1):
            trainer.train_step(dict(resident))
            if i < warmup or (i - warmup) % window == 0:
                _sync()
            times.append(time.perf_counter())
    return steady_img_s(times, trainer.batch, warmup, window)


def measure_loop(cfg, warmup: int, window: int) -> dict:
    return loop_and_bare(Trainer(cfg), warmup, window)[0]


def loop_and_bare(trainer, warmup: int, window: int) -> tuple[dict, dict]:
    """One epoch of our real loop (Trainer.train_epoch, timed after each micro-step through its on_micro_step
    hook), then the bare step on a batch of the same data. Returns the results and that batch (on the device)."""
    times: list[float] = []

    def clock() -> None:
        i = len(times)
        if i < warmup or (i - warmup) % window == 0:
            _sync()
        times.append(time.perf_counter())

    trainer.on_micro_step = clock
    start = time.perf_counter()
    trainer.train_epoch()
    trainer.on_micro_step = None
    images = trainer.batch
    # The first micro-batch's time includes the loader's start and, with compile=True, the compilation.
    loop = {**steady_img_s(times, images, warmup, window), **peak_memory(), "first_step_s": times[0] - start}
    resident = trainer.prepare_batch(next(iter(trainer.train_loader)))
    bare = measure_bare(trainer, resident, warmup, window)
    return {
        "loop": loop,
        "bare": bare,
        "devices": trainer.world,
        "precision": trainer.accelerator.mixed_precision,
        "skipped_steps": trainer.health.skipped(),
        "accumulate": trainer.schedule.accumulate,
        "forward_gflops": forward_gflops(trainer),
        "is_main": trainer.is_main,
    }, resident


def forward_gflops(trainer) -> float:
    """Ultralytics' FLOP count at imgsz, on a copy of the plain eval model. Not on the trained model: with
    compile=True its forward is compiled in place, and the counter's per-module hooks and small proxy images made
    Dynamo recompile module after module (still compiling after minutes)."""

    return get_flops(copy.deepcopy(trainer.eval_model), trainer.cfg.imgsz)


def measure_loader(cfg, warmup: int, window: int) -> dict:
    data = check_dataset(cfg.data)
    dataset = build_dataset(ultralytics_args(cfg, cfg.data), data, "train", cfg.batch, 32)
    loader = build_train_loader(dataset, cfg, cfg.batch, rank=0, world=1, use_cuda=False, workers=cfg.workers)
    times = []
    for _ in loader:
        times.append(time.perf_counter())
    return {"workers": cfg.workers, **steady_img_s(times, cfg.batch, warmup, window)}


def measure_ultralytics(cfg, out: Path, warmup: int, window: int) -> dict:

    offline_ultralytics_trainer()
    times: list[float] = []
    model = YOLO(cfg.model)
    model.add_callback("on_train_batch_end", lambda trainer: times.append(time.perf_counter()))
    model.train(
        data=cfg.data,
        imgsz=cfg.imgsz,
        batch=cfg.batch,
        epochs=1,
        workers=cfg.workers,
        cache=cfg.cache or False,
        val=False,
        plots=False,
        close_mosaic=0,
        device=0 if torch.cuda.is_available() else "cpu",
        project=str(out),
        name="ultralytics",
        exist_ok=True,
        amp=True,
        verbose=False,
    )
    return {**steady_img_s(times, cfg.batch, warmup, window), **peak_memory()}
