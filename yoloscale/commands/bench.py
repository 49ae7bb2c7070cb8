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
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import accelerate
import torch
import ultralytics

from yoloscale.commands.settings import training_config
from yoloscale.commands.timed_runs import device_name, fmt, launcher, run_logged, save_chart
from yoloscale.config import TrainConfig, parse_command, parse_override, setting
from yoloscale.errors import UserError
from yoloscale.speed.step_timing import (
    matmul_peak_tflops,
    measure_loader,
    measure_loop,
    measure_ultralytics,
    mfu,
    scaling_efficiency,
)
from yoloscale.training.synth import write_synthetic_dataset


# --- orchestration ---------------------------------------------------------------------------------------------------
def _measure_one(kind: str, cfg, opts) -> None:
    """Child process: run one measurement and write OUT/KIND.json (rank 0 only)."""
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
    return training_config(None, {**cfg.to_dict(), **dict(parse_override(a) for a in variant)})


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
        "device": device_name(),
        "versions": _versions(),
    }


def _versions() -> dict:
    return {"torch": torch.__version__, "ultralytics": ultralytics.__version__, "accelerate": accelerate.__version__}


def table(summary: dict) -> str:
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
    rows = summary["rows"]

    def draw(ax) -> None:
        labels = [f"{r['what']} x{r['devices']}" for r in rows]
        ax.barh(labels[::-1], [r["img_s"] for r in rows][::-1], color="tab:blue")
        ax.set_xlabel("images / s (steady state, median of windows)")
        ax.set_title(f"{summary['device']}: {summary['config']['model']} @ {summary['config']['imgsz']}", fontsize=10)

    save_chart(path, (8, 0.45 * len(rows) + 1.2), draw)


def bench(cfg, opts) -> dict:
    """Parent process: data, one child per measurement, then the summary."""
    opts.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(opts.out / "runs", ignore_errors=True)  # the children's scratch run directories
    steps = opts.warmup + 3 * opts.window + 1
    if cfg.data == "synthetic":
        data = write_synthetic_dataset(
            opts.out / "data", n_train=steps * cfg.batch * max(opts.gpus), n_val=8, size=cfg.imgsz
        )
        cfg = dataclasses.replace(cfg, data=str(data))
    results = {}
    for kind in _kinds(opts):
        n = int(kind.rsplit("-", 1)[1]) if kind.startswith("loop-") else 1
        # Our loop always under torchrun, one process included: every backend then finds the process-group
        # environment it expects (DeepSpeed needs one even for a single GPU).
        launcher_args = launcher(n, torchrun=kind.startswith("loop-"))
        # the per-device batch stays what one GPU runs: several GPUs measure weak scaling
        per_device = [f"device_batch={cfg.device_batch or cfg.batch}"] if kind.startswith("loop-") else []
        cmd = [
            *launcher_args,
            "-m",
            "yoloscale",
            "bench",
            *opts.settings,
            f"data={cfg.data}",
            *per_device,
            *opts.flags,
            f"--only={kind}",
        ]
        rc, seconds = run_logged(cmd, opts.out / f"{kind}.log")
        print(
            f"{kind}: {'ok' if rc == 0 else f'FAILED (exit {rc}, see {kind}.log)'} in {seconds:.0f}s",
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
    return "bf16,fp16" if torch.cuda.is_available() else "fp32"


def run(args: list[str], only: str | None = None) -> None:
    """Entry point of `yoloscale bench [config.yaml] key=value ...` (`only`: one measurement, in a child)."""
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
    cfg = training_config(cfg_file, overrides)
    for variant in opts.variants:
        with_variant(cfg, variant)  # a bad key or value stops here, before any measurement
    if only:
        cfg = dataclasses.replace(
            cfg, epochs=1, val=False, plots=False, close_mosaic=0, project=str(opts.out / "runs"), name=only
        )
        _measure_one(only, cfg, opts)
    else:
        bench(cfg, opts)
