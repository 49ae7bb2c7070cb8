"""Sweeps on the CPU: trials side by side against one trial alone, and pruning against none. Prints a table and
writes sweep_cpu.json into OUT.

    python benchmarks/sweep_cpu.py [OUT]        # about 18 minutes on 2 cores

1. Side by side: N trials at once, one core each (`trials_per_gpu=N` on N cores), against one trial alone on one
   core (the CPU analogue of N trials on N GPUs against one on one GPU).
2. Pruning: a 20-trial sweep (random sampler, so every sweep tries the same 20 points) without pruning, with the
   median pruner (with and without the val-loss tie-break) and with successive halving: wall time and best
   objective.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage

from yoloscale.training.synth import write_synthetic_dataset

PRUNERS = {  # name: the sweep's keys (tie_break=val_loss is the default)
    "none": ["pruner=none"],
    "median": ["pruner=median"],
    "median, tie_break=none": ["pruner=median", "tie_break=none"],
    "halving": ["pruner=halving"],
}
TRAIN = ["model=yolov8n.yaml", "imgsz=96", "batch=8", "nbs=8", "workers=0", "warmup_epochs=0.5", "close_mosaic=0"]
TRAIN += ["plots=False", "optimizer=SGD", "epochs=20"]


def sweep(out: Path, space: Path, data: Path, *keys: str, cores: str | None = None) -> float:
    command = [sys.executable, "-m", "yoloscale", "sweep", str(space), f"data={data}", *TRAIN, f"out={out}", *keys]
    if cores:
        command = ["taskset", "-c", cores, *command]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def study(out: Path):
    return optuna.load_study(
        study_name=out.name, storage=JournalStorage(JournalFileBackend(str(out / "study.journal")))
    )


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/sweep-bench").resolve()
    if root.exists() and any(root.iterdir()):
        sys.exit(f"{root} is not empty")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = write_synthetic_dataset(root / "data", n_train=96, n_val=24, size=128)
    cores = len(os.sched_getaffinity(0))
    space = root / "space.yaml"
    space.write_text(
        "lr0: {type: float, low: 0.0001, high: 0.1, log: true}\nmosaic: {type: float, low: 0.5, high: 1.0}\n"
    )
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")), "unknown CPU")
    results = {"cores": cores, "cpu": cpu}

    alone = sweep(root / "alone", space, data, "trials=1", "gpus=cpu", cores="0")
    side = sweep(root / "side", space, data, f"trials={cores}", f"trials_per_gpu={cores}", "gpus=cpu")
    queue = sweep(root / "queue", space, data, f"trials={cores}", "trials_per_gpu=1", "gpus=cpu")
    results["side_by_side"] = {
        "one_trial_one_core_s": alone,
        f"{cores}_at_once_s": side,
        f"{cores}_one_by_one_s": queue,
    }

    common = ["trials=20", f"trials_per_gpu={cores}", "gpus=cpu", "sampler=random"]
    folder = {name: root / name.replace(", ", "-").replace("=", "") for name in PRUNERS}
    seconds = {name: sweep(folder[name], space, data, *common, *keys) for name, keys in PRUNERS.items()}
    results["pruning"] = {
        name: {
            "seconds": seconds[name],
            "time_saved": 1 - seconds[name] / seconds["none"],
            "best": study(folder[name]).best_value,
            "trials_pruned": [t.state.name for t in study(folder[name]).trials].count("PRUNED"),
        }
        for name in PRUNERS
    }
    (root / "sweep_cpu.json").write_text(json.dumps(results, indent=1))
    print(f"{cores} cores ({results['cpu']})")
    print(f"one trial alone on one core        {alone:7.1f} s")
    print(f"{cores} trials at once, one core each  {side:7.1f} s   ({side / alone:.2f}x one trial)")
    print(f"{cores} trials one by one, all cores   {queue:7.1f} s")
    for name, p in results["pruning"].items():
        print(
            f"20 trials, {name:23} {p['seconds']:7.1f} s   best mAP50-95 {p['best']:.4f}, "
            f"{p['trials_pruned']:2} pruned, time saved {p['time_saved']:.0%}"
        )


if __name__ == "__main__":
    main()
