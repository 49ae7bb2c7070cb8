"""What `yoloscale bench` and `yoloscale race` share: a trainer run in a fresh process (plain Python, or torchrun for
several devices) with its output in a log and its wall-clock timed; the device it ran on; the number format of their
tables and the frame of their charts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from yoloscale.distributed.rendezvous import free_port


def launcher(processes: int, torchrun: bool) -> list[str]:
    """The start of a child's command line: `python`, or torchrun with `processes` processes on a free port."""
    if not torchrun:
        return [sys.executable]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        f"--master_port={free_port()}",
    ]


def run_logged(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run `cmd` with stdout and stderr in `log` (offline: Ultralytics downloads nothing); (exit code, seconds)."""
    start = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "YOLO_OFFLINE": "1"}).returncode
    return rc, time.time() - start


def device_name(gpus: int = 1) -> str:
    """'N x <GPU name>' (just the name for one), or 'cpu'."""

    if not gpus or not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0)
    return name if gpus == 1 else f"{gpus} x {name}"


def fmt(value: float | None, spec: str) -> str:
    """A table cell: the number in `spec`, or '-' where there is none."""
    return "-" if value is None else format(value, spec)


def save_chart(path: Path, size: tuple[float, float], draw: Callable) -> None:
    """One matplotlib figure drawn by `draw(ax)` and written to `path` (no display needed)."""
    # matplotlib where a chart is drawn: its Agg backend is chosen before pyplot is imported
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
