"""Preemption: SIGUSR1 / SIGTERM ask the run to stop; every rank agrees, a checkpoint is written, and under Slurm the
job requeues itself.

Slurm sends SIGUSR1 `--signal=USR1@90` seconds before a time limit or preemption (and SIGTERM when it cancels).
The handler only records the signal; the trainer asks all ranks at its next logging interval whether any of them got
one (a max all-reduce, at a point where it already synchronises), so every rank stops at the same optimizer step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading


class Preempted(Exception):
    """Raised after the stop checkpoint is written; the CLI reports it and exits 0 (the work is saved)."""


class StopSignal:
    """Records SIGUSR1/SIGTERM instead of dying, so the trainer can save first."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. not inside a notebook worker)
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        self.received = signum


def requeue_slurm_job() -> str | None:
    """`scontrol requeue $SLURM_JOB_ID` when running under Slurm; returns what was done (None outside Slurm)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    if os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        return f"scontrol requeue {job} failed: {result.stderr.strip()}"
    return f"requeued Slurm job {job}"
