"""`yoloscale race`: Ultralytics' own trainer and ours on the same data.yaml, model, imgsz, epochs and batch, one after
the other on the same devices, each in a fresh process, as a user compares them.

    yoloscale race [config.yaml] [key=value ...]     # training keys (both sides) and the race's own keys:
        out=runs/race    where both runs, race.json and race.png go (a folder that holds results is refused)
        gpus=1           devices per run (0: the CPU); several: Ultralytics' own DDP and our torchrun
        sides=ultralytics,yoloscale

Both sides get model, data, imgsz, epochs, batch, workers, cache and seed, and every other key given here that
Ultralytics' trainer also has (lr0, optimizer, mosaic, ...; precision becomes its amp=). Keys that are ours alone
(backend, grad_ckpt, ...) apply to our side. Reported per side: the whole run's wall-clock from the command's start,
the time to the first optimizer step, every epoch's mAP50-95 and training img/s, and the time each epoch ended.
Ultralytics' online AMP check (it downloads weights) is replaced by `True`, the answer it gives on a healthy GPU.
With several GPUs Ultralytics trains in processes it spawns itself, where our callbacks do not reach: its epoch times
then come from its results.csv (seconds since its training started) and its first step is not timed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from ultralytics import YOLO
from ultralytics.cfg import DEFAULT_CFG_DICT

from yoloscale.commands.settings import training_config
from yoloscale.commands.timed_runs import device_name, fmt, launcher, run_logged, save_chart
from yoloscale.compat import offline_ultralytics_trainer
from yoloscale.config import SYNTHETIC_DEFAULTS, parse_command, parse_override, setting
from yoloscale.errors import UserError
from yoloscale.training.synth import write_synthetic_dataset


@dataclass
class RaceSettings:
    out: str = setting(
        "runs/race", "Where both runs, race.json and race.png go (a folder that holds results is refused)."
    )
    gpus: int = setting(
        -1,
        "Devices per run (0: the CPU; -1: one GPU where there is one, else the CPU); several: Ultralytics' own DDP and our torchrun.",
    )
    sides: str = setting("ultralytics,yoloscale", "Which trainers to run, in order.")
    panel: str = setting(
        "",
        "A panel of cases instead of one race: 'default' (yolo11x at 640, yolo11l at 512, yolov8s at 320, on the hard "
        "synthetic set) or a YAML file (race_panel.py says its form). Keys given here apply to every case.",
    )
    repeats: int = setting(1, "Races per case of a panel (seed 0, 1, ...): the spread between repeats is the noise.")


SHARED = ("model", "data", "imgsz", "epochs", "batch", "workers", "cache", "seed")
AMP = {"auto": True, "fp16": True, "bf16": "bf16", "fp32": False}


def split_args(args: list[str]) -> tuple[str | None, list[str], dict[str, Any]]:
    """(config file, training overrides, race settings) from the command line."""
    ns, cfg_file, train = parse_command(RaceSettings, args, "race")
    sides = [s for s in ns.sides.split(",") if s]
    if not sides or set(sides) - {"ultralytics", "yoloscale"}:
        raise UserError(f"race: sides={ns.sides!r}; choose from ultralytics,yoloscale.")
    if ns.gpus < -1:
        raise UserError(f"race: gpus={ns.gpus} must be >= 0 (0: the CPU), or -1 (a GPU where there is one).")
    if ns.gpus == -1:
        ns.gpus = 1 if torch.cuda.is_available() else 0
    if ns.repeats < 1:
        raise UserError(f"race: repeats={ns.repeats} must be >= 1.")
    return cfg_file, train, {"out": ns.out, "gpus": ns.gpus, "sides": sides, "panel": ns.panel, "repeats": ns.repeats}


def with_synthetic_defaults(cfg, given: list[str]) -> list[str]:
    """The command line for our side when the race trains on the embedded synthetic set: its data.yaml, and the
    settings that set implies (imgsz, epochs), which a data= path alone would not bring back."""
    named = {key for key, _ in map(parse_override, given)}
    implied = [f"{k}={getattr(cfg, k)}" for k in SYNTHETIC_DEFAULTS if k not in named]
    return [*(a for a in given if parse_override(a)[0] != "data"), f"data={cfg.data}", *implied]


def ultralytics_settings(cfg, given: list[str], gpus: int) -> dict[str, Any]:
    """The keyword arguments of Ultralytics' `YOLO(model).train(...)` for this race."""
    settings = {k: getattr(cfg, k) for k in SHARED}
    settings["cache"] = cfg.cache or False
    for key, _ in map(parse_override, given):
        if key in ("precision", "amp"):
            settings["amp"] = AMP[cfg.precision]
        elif key in DEFAULT_CFG_DICT and key not in ("project", "name", "exist_ok", "device", "resume"):
            settings[key] = getattr(cfg, key)
    settings["device"] = ",".join(map(str, range(gpus))) if gpus else "cpu"
    return settings


def run_ultralytics(spec_file: str) -> None:
    """Child process: Ultralytics' trainer with timing callbacks; writes the events next to the spec."""
    spec = json.loads(Path(spec_file).read_text())
    offline_ultralytics_trainer()
    start = psutil.Process().create_time()
    # its phases before the first step, as ours are logged (trainer.py): phase -> seconds since the command started
    marks: dict[str, float] = {"imports": time.time() - start}
    events: dict[str, Any] = {"first_step_s": None, "epochs": [], "startup_s": {}}
    epoch_start, train_s = [0.0], [None]

    def mark(phase: str) -> None:
        marks.setdefault(phase, time.time() - start)

    def batch_end(trainer):
        if events["first_step_s"] is None:
            events["first_step_s"] = time.time() - start
            mark("first step")
            ends = list(marks.items())
            events["startup_s"] = {k: round(t - (ends[i - 1][1] if i else 0.0), 2) for i, (k, t) in enumerate(ends)}

    def fit_epoch_end(trainer):  # after validation; also fired by its final evaluation, which trains no epoch
        if train_s[0] is None:
            return
        events["epochs"].append(
            {
                "epoch": trainer.epoch + 1,
                "time_s": time.time() - start,
                "map50_95": float(trainer.metrics.get("metrics/mAP50-95(B)", "nan")),
                "img_s": len(trainer.train_loader.dataset) / max(train_s[0], 1e-9),
            }
        )
        train_s[0] = None

    model = YOLO(spec["settings"]["model"])
    mark("model")
    model.add_callback("on_pretrain_routine_start", lambda trainer: mark("devices"))  # its trainer is built
    model.add_callback("on_pretrain_routine_end", lambda trainer: mark("data and optimizer"))
    model.add_callback("on_train_batch_start", lambda trainer: mark("first batch"))
    model.add_callback("on_train_batch_end", batch_end)
    model.add_callback("on_train_epoch_start", lambda trainer: epoch_start.__setitem__(0, time.time()))
    model.add_callback("on_train_epoch_end", lambda trainer: train_s.__setitem__(0, time.time() - epoch_start[0]))
    model.add_callback("on_fit_epoch_end", fit_epoch_end)
    model.train(
        **{k: v for k, v in spec["settings"].items() if k != "model"},
        project=spec["project"],
        name="ultralytics",
        exist_ok=False,
        plots=False,
        verbose=False,
    )
    Path(spec["events"]).write_text(json.dumps(events))


def _epochs_from_results_csv(path: Path) -> list[dict]:
    """Either side's results.csv (the same columns). Ours times from the command's start and has img_s;
    Ultralytics' (read for its multi-GPU runs) times from its training's start and has no img_s."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [
        {
            "epoch": int(float(r["epoch"])),
            "time_s": float(r["time"]),
            "map50_95": float(r.get("metrics/mAP50-95(B)") or "nan"),
            "img_s": float(r["img_s"]) if r.get("img_s") else None,
        }
        for r in rows
    ]


def _launch(cmd: list[str], log: Path) -> float:
    rc, seconds = run_logged(cmd, log)
    if rc != 0:
        raise UserError(f"race: the run failed (exit {rc}); see {log}")
    return seconds


def race(cfg_file: str | None, given: list[str], settings: dict) -> dict:
    out = Path(settings["out"])
    if out.exists() and any(out.iterdir()):
        raise UserError(f"race: '{out}' already holds results; it is never overwritten. Choose another out=.")
    out.mkdir(parents=True, exist_ok=True)
    cfg = training_config(cfg_file, given)  # every key checked before anything runs
    if cfg.data == "synthetic":  # one copy both sides read
        cfg = dataclasses.replace(cfg, data=str(write_synthetic_dataset(out / "data")))
        given = with_synthetic_defaults(cfg, given)
    gpus, results = settings["gpus"], {}
    if "ultralytics" in settings["sides"]:
        spec = {
            "settings": ultralytics_settings(cfg, given, gpus),
            "project": str(out.resolve()),
            "events": str(out / "ultralytics-events.json"),
        }
        (out / "ultralytics-spec.json").write_text(json.dumps(spec))
        print(f"ultralytics: training ({out / 'ultralytics.log'})", flush=True)
        wall = _launch(
            [sys.executable, "-m", "yoloscale.commands.race", str(out / "ultralytics-spec.json")],
            out / "ultralytics.log",
        )
        events = json.loads((out / "ultralytics-events.json").read_text())
        if gpus > 1 or not events["epochs"]:
            events["epochs"] = _epochs_from_results_csv(out / "ultralytics" / "results.csv")
        results["ultralytics"] = {"wall_s": wall, **events}
    if "yoloscale" in settings["sides"]:
        ours = [
            *launcher(gpus, torchrun=gpus > 1),
            "-m",
            "yoloscale",
            "train",
            *([cfg_file] if cfg_file else []),
            *given,
            f"project={out}",
            "name=yoloscale",
            "exist_ok=True",  # this folder, or an error: never a yoloscale2 that the race would not read
            *(["cpu=True"] if gpus == 0 else []),
        ]
        print(f"yoloscale: training ({out / 'yoloscale.log'})", flush=True)
        wall = _launch(ours, out / "yoloscale.log")
        info = json.loads((out / "yoloscale" / "run_info.json").read_text())
        results["yoloscale"] = {
            "wall_s": wall,
            "first_step_s": info.get("first_step_s"),
            "startup_s": info.get("startup_s", {}),
            "epochs": _epochs_from_results_csv(out / "yoloscale" / "results.csv"),
        }
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name(gpus),
        "config": cfg.to_dict(),
        "gpus": gpus,
        "sides": results,
    }
    (out / "race.json").write_text(json.dumps(summary, indent=1))
    chart(summary, out / "race.png")
    print(table(summary))
    return summary


def epoch_img_s(side: dict) -> float | None:
    """Median training img/s over the epochs after the first (which carries the start-up)."""
    rates = [e["img_s"] for e in side["epochs"][1:] if e["img_s"]] or [e["img_s"] for e in side["epochs"] if e["img_s"]]
    return statistics.median(rates) if rates else None


def table(summary: dict) -> str:
    c = summary["config"]
    lines = [
        f"{summary['device']}: {c['model']} at {c['imgsz']} px, batch {c['batch']}, {c['epochs']} epochs, "
        f"{summary['date']}",
        f"{'side':<12}{'wall s':>9}{'1st step s':>11}{'img/s':>8}  mAP50-95 by epoch",
    ]
    for name, side in summary["sides"].items():
        maps = " ".join(f"{e['map50_95']:.3f}" for e in side["epochs"])
        lines.append(
            f"{name:<12}{side['wall_s']:>9.1f}{fmt(side['first_step_s'], '.1f'):>11}"
            f"{fmt(epoch_img_s(side), '.1f'):>8}  {maps}"
        )
    for name, side in summary["sides"].items():
        if side.get("startup_s"):
            phases = ", ".join(f"{phase} {t:.1f}" for phase, t in side["startup_s"].items())
            lines.append(f"{name} to its first step: {phases} s")
    sides = summary["sides"]
    if len(sides) == 2:
        lines.append(
            f"yoloscale / ultralytics wall-clock: {sides['yoloscale']['wall_s'] / sides['ultralytics']['wall_s']:.2f}x"
        )
    return "\n".join(lines)


def chart(summary: dict, path: Path) -> None:
    def draw(ax) -> None:
        for name, side in summary["sides"].items():
            times, maps = [e["time_s"] for e in side["epochs"]], [e["map50_95"] for e in side["epochs"]]
            ax.plot(times, maps, marker="o", label=name)
        ax.set_xlabel("wall-clock since the command started, s")
        ax.set_ylabel("val mAP50-95")
        c = summary["config"]
        ax.set_title(f"{summary['device']}: {c['model']} @ {c['imgsz']}, batch {c['batch']}", fontsize=10)
        ax.legend()

    save_chart(path, (7, 4), draw)


if __name__ == "__main__":  # the Ultralytics side, in its own process
    os.environ.setdefault("YOLO_OFFLINE", "1")
    run_ultralytics(sys.argv[1])
