"""What a run reports: a progress bar (rank 0), results.csv (Ultralytics' columns, then ours), results.png at the
end, and optional wandb.

Only the main process writes. wandb is optional: 'offline' needs no account or key; whatever the mode, only our
own configuration is sent (never the environment, the command line or the code).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
from tqdm import tqdm

from yoloscale.config import TrainConfig
from yoloscale.errors import UserError


def seconds_since_start() -> float:
    """Wall-clock seconds since this process started (what a user measures from the command)."""

    return time.time() - psutil.Process().create_time()


class RunLog:
    def __init__(self, cfg: TrainConfig, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.csv_path = run_dir / "results.csv"
        if enabled:
            convert_metrics_csv(run_dir)
        self.png_path = run_dir / "results.png"
        self.run_dir = run_dir
        self.bar = None
        self.wandb = None
        if enabled and cfg.wandb != "off":
            self.wandb = _start_wandb(cfg, run_dir)

    # --- progress bar ---------------------------------------------------------------------------------------------
    def epoch_bar(self, iterable: Iterable, total: int, epoch: int, epochs: int) -> Iterable:
        if not self.enabled:
            return iterable

        self.bar = tqdm(
            iterable,
            total=total,
            desc=f"epoch {epoch + 1}/{epochs}",
            dynamic_ncols=True,
            bar_format="{l_bar}{bar:20}{r_bar}",
            mininterval=0.5,
        )
        return self.bar

    def step(self, values: dict[str, float], step: int) -> None:
        """Progress-bar postfix and (if enabled) a wandb point, at the logging interval."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix({k: _fmt(v) for k, v in values.items()}, refresh=False)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    # --- per-epoch table ------------------------------------------------------------------------------------------
    def epoch_end(self, row: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        append_csv_row(self.csv_path, row)
        shown = {k: v for k, v in row.items() if k.startswith(("metrics/mAP", "train/", "img_s"))}
        self.message("  ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def forget_epochs_after(self, epochs_done: int) -> None:
        """On resume: rows of epochs after the checkpoint's go (they are trained again, and written again), so that
        results.csv never holds an epoch twice."""
        if not self.enabled or not self.csv_path.exists():
            return
        with open(self.csv_path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = list(reader.fieldnames or []), list(reader)
        kept = [r for r in rows if int(float(r["epoch"])) <= epochs_done]
        if len(kept) == len(rows):
            return
        write_csv(self.csv_path, fields, kept)

    def finish(self, plots: bool) -> None:
        if not self.enabled:
            return
        if plots and self.csv_path.exists():
            plot_metrics(self.csv_path, self.png_path)
        if self.wandb is not None:
            self.wandb.finish()


# metrics.csv (written before results.csv had Ultralytics' names) -> results.csv's columns
_OLD_COLUMNS = {
    "val/precision": "metrics/precision(B)",
    "val/recall": "metrics/recall(B)",
    "val/mAP50": "metrics/mAP50(B)",
    "val/mAP50-95": "metrics/mAP50-95(B)",
    "val/fitness": "fitness",
    "lr": "lr/pg0",
}


def convert_metrics_csv(run_dir: Path) -> None:
    """A run written by an earlier version has metrics.csv: its rows become results.csv under today's column names
    (a resumed run then appends to one file)."""
    old, new = run_dir / "metrics.csv", run_dir / "results.csv"
    if not old.is_file() or new.exists():
        return
    with open(old, newline="") as f:
        reader = csv.DictReader(f)
        fields = [_OLD_COLUMNS.get(k, k) for k in reader.fieldnames or []]
        rows = [{_OLD_COLUMNS.get(k, k): v for k, v in r.items()} for r in reader]
    write_csv(new, fields, rows)
    old.unlink()


def append_csv_row(path: Path, row: dict[str, Any]) -> None:
    """Append a row; when it brings new columns (validation metrics after epochs without validation), rewrite the
    file with the widened header, atomically, so every row stays under its own column names."""
    rows, fields = [], list(row)
    if path.exists():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old = list(reader.fieldnames or [])
            if set(fields) <= set(old):
                with open(path, "a", newline="") as out:
                    csv.DictWriter(out, fieldnames=old).writerow(row)
                return
            rows = list(reader)
        fields = old + [k for k in fields if k not in old]
    write_csv(path, fields, [*rows, row])


def write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    """The whole file, atomically (a temporary file renamed over it)."""
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _start_wandb(cfg: TrainConfig, run_dir: Path):
    try:
        # wandb is optional (wandb= off by default)
        import wandb
    except ImportError:
        raise UserError("wandb=... needs the wandb package: pip install 'yoloscale[wandb]'.") from None
    settings = wandb.Settings(save_code=False, disable_git=True, x_disable_meta=True, console="off")
    return wandb.init(
        project=cfg.wandb_project,
        name=run_dir.name,
        dir=str(run_dir),
        mode=cfg.wandb,
        config=cfg.to_dict(),
        settings=settings,
    )


def plot_metrics(csv_path: Path, png_path: Path) -> None:
    """One small panel per numeric column of metrics.csv, against the epoch."""
    # matplotlib where a chart is drawn: its Agg backend is chosen before pyplot is imported
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    keys = [k for k in rows[0] if k != "epoch" and _is_number(rows[0][k])]
    epochs = [int(r["epoch"]) for r in rows]
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(4 * cols, 3 * math.ceil(len(keys) / cols)))
    for ax, key in zip(getattr(axes, "flat", [axes]), keys):
        ax.plot(epochs, [float(r[key]) if _is_number(r[key]) else math.nan for r in rows], marker=".")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
    for ax in list(getattr(axes, "flat", [axes]))[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except (TypeError, ValueError):
        return False


class StartupClock:
    """Where the time to the first optimizer step goes: each phase's end, in seconds since the command started."""

    def __init__(self) -> None:
        self.ends = {"imports": seconds_since_start()}

    def mark(self, phase: str) -> None:
        self.ends.setdefault(phase, seconds_since_start())

    def phases(self) -> dict[str, float]:
        """Each phase's own seconds, in order."""
        ends = list(self.ends.items())
        return {phase: round(t - (ends[i - 1][1] if i else 0.0), 2) for i, (phase, t) in enumerate(ends)}

    def first_step_line(self) -> str:
        took = self.phases()
        return (
            f"first optimizer step {self.ends['first step']:.1f} s after the command started ("
            + ", ".join(f"{phase} {t:.1f}" for phase, t in took.items())
            + " s)"
        )


def results_row(
    epoch: int, losses: dict, metrics: dict, columns: dict, param_groups: list, extra: dict[str, Any]
) -> dict[str, Any]:
    """results.csv's row: Ultralytics' columns in its order (epoch, time, train losses, precision, recall, mAPs, val
    losses, each parameter group's lr), then ours (`extra`, and fitness). `columns`: metric key -> its column."""
    row = {"epoch": epoch, "time": round(seconds_since_start(), 2)}
    row.update({f"train/{k}": v for k, v in losses.items()})
    row.update({columns[k]: metrics[k] for k in ("precision", "recall", "mAP50", "mAP50-95") if k in metrics})
    row.update({f"val/{k}": v for k, v in metrics.items() if k not in columns})
    row.update({f"lr/pg{i}": g["lr"] for i, g in enumerate(param_groups)})
    row.update(extra)
    if "fitness" in metrics:
        row["fitness"] = metrics["fitness"]
    return row
