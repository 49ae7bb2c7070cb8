"""`yoloscale bench`: Ultralytics' trainer, our loop, the bare-step ceiling and the data loader, side by side.

    yoloscale bench [config.yaml] [key=value ...] [out=DIR] [precisions=bf16,fp16] [gpus=1,2]
                    [loader_workers=4,8,16] [skip=ultralytics,loader]

Settings (model, imgsz, batch, data, workers...) are the training configuration's; `data=synthetic` writes a
synthetic set of the right size at `imgsz`. Every measurement runs in a fresh process (torchrun for several GPUs),
so peak memory is its own. Method, also written into the JSON:
  * steady state: the first `warmup` micro-batches are dropped; img/s is the median over windows of `window`
    micro-batches, each closed by a device synchronisation. Several GPUs: global img/s (timed on rank 0).
  * ultralytics: `YOLO(model).train(...)`, default AMP (fp16 + GradScaler), timed per batch from its
    `on_train_batch_end` callback (its loop reads the losses on the host every batch). Its online AMP check, which
    downloads weights, is replaced by `True`, the answer it gives on a healthy GPU.
  * loop: our Trainer's own train_epoch(), timed through its on_micro_step hook; bare: the same train_step() on
    one batch kept on the device.
  * loader: our train loader alone (Ultralytics' dataset and augmentation), img/s per worker count.
  * MFU = img/s x 3 x forward FLOPs per image (Ultralytics' count at imgsz) / (GPUs x peak), peak measured in the
    same run with an 8192^3 bf16 matmul on CUDA (a 2048^3 fp32 matmul on the CPU).
Outputs: a table on the terminal, OUT/bench.json and OUT/bench.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from yoloscale.config import TrainConfig, setting
from yoloscale.errors import UserError


# --- arithmetic (unit-tested) ------------------------------------------------------------------------------------
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
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak_tflops() -> dict:
    import torch

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
    import torch

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
    from yoloscale.trainer import Trainer

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
    import copy

    from ultralytics.utils.torch_utils import get_flops

    return get_flops(copy.deepcopy(trainer.eval_model), trainer.cfg.imgsz)


def measure_loader(cfg, warmup: int, window: int) -> dict:
    from yoloscale.data import build_dataset, build_train_loader, check_dataset, ultralytics_args

    data = check_dataset(cfg.data)
    dataset = build_dataset(ultralytics_args(cfg, cfg.data), data, "train", cfg.batch, 32)
    loader = build_train_loader(dataset, cfg, cfg.batch, rank=0, world=1, use_cuda=False, workers=cfg.workers)
    times = []
    for _ in loader:
        times.append(time.perf_counter())
    return {"workers": cfg.workers, **steady_img_s(times, cfg.batch, warmup, window)}


def measure_ultralytics(cfg, out: Path, warmup: int, window: int) -> dict:
    import torch
    from ultralytics import YOLO

    from yoloscale.compat import offline_ultralytics_trainer

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


# --- orchestration ---------------------------------------------------------------------------------------------------
def _measure_one(kind: str, cfg, opts) -> None:
    """Child process: run one measurement and write OUT/KIND.json (rank 0 only)."""
    import dataclasses

    if kind == "peak":
        result = matmul_peak_tflops()
    elif kind == "ultralytics":
        result = measure_ultralytics(cfg, opts.out, opts.warmup, opts.window)
    elif kind.startswith("loader-"):
        result = measure_loader(dataclasses.replace(cfg, workers=int(kind.split("-")[1])), opts.warmup, opts.window)
    else:  # loop-<precision>-<devices>, or loop-<precision>-v<variant>-1
        cfg = dataclasses.replace(cfg, precision=kind.split("-")[1])
        if "-v" in kind:
            cfg = with_variant(cfg, opts.variants[int(kind.split("-v")[1].split("-")[0])])
        result = measure_loop(cfg, opts.warmup, opts.window)
        if not result.pop("is_main"):
            return
    (opts.out / f"{kind}.json").write_text(json.dumps(result))


def with_variant(cfg: TrainConfig, variant: list[str]) -> TrainConfig:
    """The configuration with a variant's key=value settings applied (checked like the command line's)."""
    from yoloscale.config import load_config, parse_override

    return load_config(None, {**cfg.to_dict(), **dict(parse_override(a) for a in variant)})


def _kinds(opts) -> list[str]:
    kinds = ["peak"]
    kinds += [] if "ultralytics" in opts.skip else ["ultralytics"]
    kinds += [f"loop-{p}-{n}" for p in opts.precisions for n in opts.gpus]
    kinds += [f"loop-{p}-v{i}-1" for p in opts.precisions for i in range(len(opts.variants))]
    kinds += [] if "loader" in opts.skip else [f"loader-{w}" for w in opts.loader_workers]
    return kinds


def summarise(results: dict, opts, cfg) -> dict:
    """Ratios, MFU and scaling efficiency from the raw measurements."""
    peak = results.get("peak", {}).get("tflops")
    ul = results.get("ultralytics", {}).get("img_s")
    rows = []
    if ul:
        rows.append(
            {
                "what": "ultralytics (fp16 AMP)",
                "devices": 1,
                "img_s": ul,
                "x_ultralytics": 1.0,
                "peak_GiB": results["ultralytics"].get("peak_GiB"),
            }
        )
    for p in opts.precisions:
        for n in opts.gpus:
            r = results.get(f"loop-{p}-{n}")
            if not r:
                continue
            one = results.get(f"loop-{p}-1")
            for part in ("loop", "bare"):
                row = {
                    "what": f"yoloscale {part} {p}",
                    "devices": n,
                    "img_s": r[part]["img_s"],
                    "peak_GiB": r[part].get("peak_GiB"),
                    "skipped_steps": r["skipped_steps"],
                }
                row["x_ultralytics"] = row["img_s"] / ul if ul else None
                row["x_ceiling"] = r["loop"]["img_s"] / r["bare"]["img_s"] if part == "loop" else None
                row["mfu"] = mfu(row["img_s"], r["forward_gflops"], peak, n) if peak and r["forward_gflops"] else None
                row["scaling"] = scaling_efficiency(row["img_s"], one[part]["img_s"], n) if one and n > 1 else None
                rows.append(row)
        eager = results.get(f"loop-{p}-1")
        for i, variant in enumerate(opts.variants):
            r = results.get(f"loop-{p}-v{i}-1")
            if r:
                row = {"what": f"yoloscale loop {p} {' '.join(variant)}", "devices": 1, "img_s": r["loop"]["img_s"]}
                row["peak_GiB"], row["skipped_steps"] = r["loop"].get("peak_GiB"), r["skipped_steps"]
                row["x_ultralytics"] = row["img_s"] / ul if ul else None
                row["x_eager"] = row["img_s"] / eager["loop"]["img_s"] if eager else None
                row["mfu"] = mfu(row["img_s"], r["forward_gflops"], peak, 1) if peak and r["forward_gflops"] else None
                row["first_step_s"] = r["loop"].get("first_step_s")
                rows.append(row)
    for w in opts.loader_workers:
        r = results.get(f"loader-{w}")
        if r:
            rows.append({"what": f"loader alone, {w} workers", "devices": 1, "img_s": r["img_s"]})
    return {
        "config": cfg.to_dict(),
        "peak": results.get("peak"),
        "rows": rows,
        "raw": results,
        "method": __doc__,
        "date": time.strftime("%Y-%m-%d"),
        "device": _device_name(),
        "versions": _versions(),
    }


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _versions() -> dict:
    import accelerate
    import torch
    import ultralytics

    return {"torch": torch.__version__, "ultralytics": ultralytics.__version__, "accelerate": accelerate.__version__}


def table(summary: dict) -> str:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [
        f"{summary['device']}, {summary['config']['model']}, imgsz {summary['config']['imgsz']}, "
        f"batch {summary['config']['batch']}/device; peak {fmt((summary['peak'] or {}).get('tflops'), '.1f')} "
        f"TFLOP/s ({(summary['peak'] or {}).get('how', '-')})",
        f"{'what':<30}{'dev':>4}{'img/s':>9}{'peak GiB':>9}{'x UL':>7}{'x ceil':>7}{'MFU':>7}{'scaling':>8}"
        f"{'x eager':>8}{'1st step s':>11}",
    ]
    for r in summary["rows"]:
        lines.append(
            f"{r['what']:<30}{r['devices']:>4}{r['img_s']:>9.1f}{fmt(r.get('peak_GiB'), '.1f'):>9}"
            f"{fmt(r.get('x_ultralytics'), '.2f'):>7}{fmt(r.get('x_ceiling'), '.2f'):>7}"
            f"{fmt(r.get('mfu'), '.1%'):>7}{fmt(r.get('scaling'), '.2f'):>8}"
            f"{fmt(r.get('x_eager'), '.2f'):>8}{fmt(r.get('first_step_s'), '.1f'):>11}"
        )
    return "\n".join(lines)


def chart(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    labels = [f"{r['what']} x{r['devices']}" for r in rows]
    ax.barh(labels[::-1], [r["img_s"] for r in rows][::-1], color="tab:blue")
    ax.set_xlabel("images / s (steady state, median of windows)")
    ax.set_title(f"{summary['device']}: {summary['config']['model']} @ {summary['config']['imgsz']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bench(cfg, opts) -> dict:
    """Parent process: data, one child per measurement, then the summary."""
    import shutil

    from yoloscale.synth import write_synthetic_dataset

    opts.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(opts.out / "runs", ignore_errors=True)  # the children's scratch run directories
    steps = opts.warmup + 3 * opts.window + 1
    if cfg.data == "synthetic":
        cfg.data = str(
            write_synthetic_dataset(
                opts.out / "data", n_train=steps * cfg.batch * max(opts.gpus), n_val=8, size=cfg.imgsz
            )
        )
    from yoloscale.devices import free_port

    results = {}
    for kind in _kinds(opts):
        n = int(kind.rsplit("-", 1)[1]) if kind.startswith("loop-") else 1
        # Our loop always under torchrun, one process included: every backend then finds the process-group
        # environment it expects (DeepSpeed needs one even for a single GPU).
        launcher = (
            [sys.executable]
            if not kind.startswith("loop-")
            else [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(n),
                "--master_port",
                str(free_port()),
            ]
        )
        # the per-device batch stays what one GPU runs: several GPUs measure weak scaling
        per_device = [f"device_batch={cfg.device_batch or cfg.batch}"] if kind.startswith("loop-") else []
        cmd = [
            *launcher,
            "-m",
            "yoloscale",
            "bench",
            *opts.settings,
            f"data={cfg.data}",
            *per_device,
            *opts.flags,
            f"--only={kind}",
        ]
        t = time.time()
        with open(opts.out / f"{kind}.log", "w") as log:
            rc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "YOLO_OFFLINE": "1"}
            ).returncode
        print(
            f"{kind}: {'ok' if rc == 0 else f'FAILED (exit {rc}, see {kind}.log)'} in {time.time() - t:.0f}s",
            flush=True,
        )
        if rc == 0:
            results[kind] = json.loads((opts.out / f"{kind}.json").read_text())
    summary = summarise(results, opts, cfg)
    (opts.out / "bench.json").write_text(json.dumps(summary, indent=1))
    chart(summary, opts.out / "bench.png")
    print(table(summary))
    return summary


def _int_list(text: str, flag: str, minimum: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise UserError(f"bench: {flag} takes a comma list of integers, got {text!r}.") from None
    if any(v < minimum for v in values):
        raise UserError(f"bench: {flag} values must be >= {minimum}, got {text!r}.")
    return values


@dataclass
class BenchSettings:
    out: str = setting("runs/bench", "Output folder (bench.json, bench.png, logs).")
    precisions: str = setting(
        "",
        "Precisions of our loop to measure (comma list of bf16, fp16, fp32); empty: bf16,fp16 on a GPU, fp32 on the CPU.",
    )
    gpus: str = setting("1", "Device counts, e.g. 1,2,8 (several: launched with torchrun); the per-device batch stays.")
    loader_workers: str = setting("4,8,16", "Worker counts for the loader-alone measurement.")
    skip: str = setting("", "Comma list of parts to skip: ultralytics, loader.")
    variants: str = setting(
        "",
        "Variants of our step to measure beside the plain loop on one GPU, separated by ';', each a space-separated list of training keys, e.g. 'compile=True;channels_last=False' (rows 'x eager': against the plain loop of the same precision; '1st step s': what the first step took, compiling included).",
    )
    warmup: int = setting(14, "Micro-batches dropped before timing.")
    window: int = setting(10, "Micro-batches per timing window.")


def _default_precisions() -> str:
    import torch

    return "bf16,fp16" if torch.cuda.is_available() else "fp32"


def run(args: list[str], only: str | None = None) -> None:
    """Entry point of `yoloscale bench [config.yaml] key=value ...` (`only`: one measurement, in a child)."""
    import dataclasses

    from yoloscale.config import load_config, parse_command

    ns, cfg_file, overrides = parse_command(BenchSettings, args, "bench")
    opts = argparse.Namespace(
        out=Path(ns.out),
        warmup=ns.warmup,
        window=ns.window,
        precisions=[p for p in (ns.precisions or _default_precisions()).split(",") if p],
        gpus=_int_list(ns.gpus, "gpus", minimum=1),
        loader_workers=_int_list(ns.loader_workers, "loader_workers", minimum=0),
        skip=set(ns.skip.split(",")) - {""},
        variants=[v.split() for v in ns.variants.split(";") if v.strip()],
    )
    bad = [p for p in opts.precisions if p not in ("bf16", "fp16", "fp32")] + sorted(
        opts.skip - {"ultralytics", "loader"}
    )
    if bad or not opts.precisions or ns.warmup < 0 or ns.window < 1:
        raise UserError(
            f"bench: bad value(s) {bad or ''}: precisions= takes bf16,fp16,fp32; skip= takes "
            "ultralytics,loader; warmup >= 0 and window >= 1."
        )
    # what each child process is given: the same settings (data replaced by the prepared set) and timing keys
    opts.settings = ([cfg_file] if cfg_file else []) + [a for a in overrides if not a.startswith("data=")]
    opts.flags = [f"out={opts.out}", f"warmup={opts.warmup}", f"window={opts.window}", f"variants={ns.variants}"]
    cfg = load_config(cfg_file, overrides)
    for variant in opts.variants:
        with_variant(cfg, variant)  # a bad key or value stops here, before any measurement
    if only:
        cfg = dataclasses.replace(
            cfg, epochs=1, val=False, plots=False, close_mosaic=0, project=str(opts.out / "runs"), name=only
        )
        _measure_one(only, cfg, opts)
    else:
        bench(cfg, opts)
