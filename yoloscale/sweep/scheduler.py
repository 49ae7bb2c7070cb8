"""The local scheduler of a sweep worker: the node's GPUs cut into slots, one trial process per slot, asked from the
study, watched, told, and on a stop signal stopped with a checkpoint and queued to be continued.

A slot is one GPU (`trials_per_gpu` slots per GPU, side by side), several GPUs for one DDP trial (`gpus_per_trial`,
started with torchrun), or the CPU. Each trial sees only its slot's GPUs (CUDA_VISIBLE_DEVICES) and its share of the
node's cores: loader workers and CPU threads are divided between the trials running at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from yoloscale.compat import optuna_trial
from yoloscale.errors import UserError
from yoloscale.sweep.study import HEARTBEAT_S, STALE_S, counted, is_stale, requeue, this_worker
from yoloscale.sweep.trial import TRIAL_ENV, Outcome, read_outcome
from yoloscale.training.run_dir import in_use

POLL_S = 1.0
RECOVER_S = 60.0  # how often a worker looks for trials of dead workers
STOP_WAIT_S = 120.0  # after SIGTERM, how long a trial may take to write its checkpoint
MAX_ATTEMPTS = 3  # a trial that ends this often without finishing (and not stopped by us) is failed
# Variables of the worker's own environment that must not reach a trial: it is a job of its own (not rank N of the
# worker's srun step), and the worker, not the trial, requeues the worker's Slurm job on a stop signal.
STRIPPED_ENV = (
    *("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"),
    *("SLURM_PROCID", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"),
)


@dataclass
class Slot:
    devices: str  # CUDA_VISIBLE_DEVICES of its trials ("" on the CPU)
    procs: int  # training processes per trial
    threads: int  # CPU threads per training process
    workers: int  # data-loader workers per training process

    def describe(self) -> str:
        return f"GPU {self.devices}" if self.devices else "the CPU"


def visible_gpus() -> list[str]:
    """The GPUs trials may use: CUDA_VISIBLE_DEVICES' (Slurm's allocation, or the user's choice), else every one; none
    where CUDA does not work (a variable left set on a machine without a GPU names none)."""

    if not torch.cuda.is_available():
        return []
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def slot_devices(gpus: str) -> list[str]:
    """The GPUs `gpus=auto|cpu|0,1,...` names ([] for the CPU)."""
    return visible_gpus() if gpus == "auto" else [] if gpus == "cpu" else [d.strip() for d in gpus.split(",")]


def make_slots(
    gpus: str, trials_per_gpu: int, gpus_per_trial: int, workers: int, cores: int | None = None
) -> list[Slot]:
    """`gpus=auto|cpu|0,1,...`: the slots, interleaved over the GPUs (the first trials go to different GPUs)."""
    devices = slot_devices(gpus)
    if trials_per_gpu < 1 or gpus_per_trial < 1:
        raise UserError("sweep: trials_per_gpu and gpus_per_trial must be >= 1.")
    if devices and len(devices) % gpus_per_trial:
        raise UserError(
            f"sweep: {len(devices)} GPU(s) ({','.join(devices)}) do not split into groups of gpus_per_trial={gpus_per_trial}."
        )
    step = gpus_per_trial if devices else 1
    groups = [",".join(devices[i : i + step]) for i in range(0, len(devices), step)] or [""]
    cores = cores or len(os.sched_getaffinity(0))
    slots = len(groups) * trials_per_gpu
    per_process = max(cores // (slots * gpus_per_trial), 1)
    return [
        Slot(g, gpus_per_trial, per_process, min(workers, per_process)) for _ in range(trials_per_gpu) for g in groups
    ]


class TrialProcess:
    """One trial's training process (torchrun for several processes), its log, and its trial in the study. A
    trial that continues a run whose old process still holds the run directory waits until it is released."""

    def __init__(self, trial, slot: Slot, run_dir: Path, args: list[str], link: str, log: Path):
        self.trial, self.slot, self.run_dir, self.log = trial, slot, run_dir, log
        module = ["-m", "yoloscale", "train", *args]
        if slot.procs > 1:
            module = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={slot.procs}", *module]
        self.command = [sys.executable, *module]
        self.env = {k: v for k, v in os.environ.items() if k not in STRIPPED_ENV and not k.startswith("SLURM_NTASKS")}
        self.env.update({TRIAL_ENV: link, "CUDA_VISIBLE_DEVICES": slot.devices, "OMP_NUM_THREADS": str(slot.threads)})
        self.process: subprocess.Popen | None = None
        self.started = time.time()

    def poll(self) -> int | None:
        """The exit code once the process has ended; starts it first when the run directory is free."""

        if self.process is None:
            if in_use(self.run_dir) and time.time() - self.started < STALE_S:  # then it fails, saying by whom
                return None
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log, "ab") as log:
                self.process = subprocess.Popen(
                    self.command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,  # Ctrl-C reaches the sweep, which stops its trials with a checkpoint
                    preexec_fn=_die_with_parent,
                )
        return self.process.poll()

    def stop(self) -> None:
        """SIGTERM to the trial's process group: the trainer writes a checkpoint and exits."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)


def _die_with_parent() -> None:
    """In the child: SIGTERM (checkpoint and exit) when the sweep process dies, even of kill -9 (Linux)."""
    try:
        # prctl is Linux's: elsewhere the child does without
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Scheduler:
    """Run trials in the slots until the study holds `trials` trials that count, or until a stop signal."""

    def __init__(
        self, study, distributions: dict, budget: int, slots: list[Slot], start_trial, record, print_line=print
    ):
        """`start_trial(trial, slot) -> TrialProcess` builds a trial's process; `record(trial, outcome)` tells the
        study how it ended."""
        self.study, self.distributions, self.budget, self.slots = study, distributions, budget, slots
        self.start_trial, self.record, self.print = start_trial, record, print_line
        self.worker = this_worker()
        self.running: dict[int, TrialProcess] = {}  # slot index -> its trial
        self.stop_requested: str | None = None

    def run(self) -> None:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        last_heartbeat = last_recover = 0.0
        try:
            while not self.stop_requested:
                now = time.time()
                if now - last_heartbeat >= HEARTBEAT_S:
                    for p in self.running.values():
                        p.trial.set_user_attr("heartbeat", now)
                    last_heartbeat = now
                if now - last_recover >= RECOVER_S:
                    self.recover_stale()
                    last_recover = now
                self._collect()
                if not self._fill() and not self.running:
                    return
                time.sleep(POLL_S)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.running:
                self._stop_all()

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = signal.Signals(signum).name

    def budget_left(self) -> int:
        """Trials still to start here or anywhere: queued ones are started first (ask() takes them)."""
        # optuna is imported where a sweep uses it: the trainer imports sweep/trial.py, and a plain run never loads it
        from optuna.trial import TrialState

        return self.budget - sum(1 for t in counted(self.study) if t.state != TrialState.WAITING)

    def _fill(self) -> bool:
        """Start trials in the free slots; False when the budget is spent."""
        for i, slot in enumerate(self.slots):
            if i in self.running:
                continue
            if self.budget_left() <= 0:
                return False
            trial = self.study.ask(self.distributions)  # a queued trial first (continuations)
            trial.set_user_attr("worker", self.worker)
            trial.set_user_attr("heartbeat", time.time())
            if sum(1 for t in counted(self.study) if t.number < trial.number) >= self.budget:  # another worker's
                # optuna is imported where a sweep uses it: the trainer imports sweep/trial.py, and a plain run never loads it
                from optuna.trial import TrialState

                trial.set_user_attr("surplus", True)
                self.study.tell(trial, state=TrialState.FAIL)
                return False
            self.running[i] = self.start_trial(trial, slot)
        return True

    def _collect(self) -> None:
        for i, p in list(self.running.items()):
            code = p.poll()
            if code is None:
                continue
            del self.running[i]
            self._ended(p, read_outcome(p.run_dir, code, p.log, self._objective()))

    def _objective(self) -> str:
        return self.study.user_attrs["identity"]["objective"]

    def _ended(self, p: TrialProcess, outcome: Outcome) -> None:
        if outcome.state != "interrupted":
            self.record(p.trial, outcome)
            return
        lost = p.trial.user_attrs.get("lost", 0) + (self.stop_requested is None)  # ended early, not by us
        if lost >= MAX_ATTEMPTS:
            self.record(p.trial, Outcome("failed", error=f"ended without finishing {lost} times; last log {p.log}"))
            return
        requeue(self.study, p.trial, str(p.run_dir), lost)
        self.print(f"trial {p.trial.number} interrupted after {outcome.epochs} epoch(s): queued to continue")

    def recover_stale(self) -> None:
        """Trials of dead workers: recorded if their run finished, else queued to continue from their checkpoint."""
        # optuna is imported where a sweep uses it: the trainer imports sweep/trial.py, and a plain run never loads it
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if any(p.trial.number == t.number for p in self.running.values()) or not is_stale(t):
                continue
            run_dir = t.user_attrs.get("run_dir")
            outcome = read_outcome(Path(run_dir) if run_dir else None, None, Path(os.devnull), self._objective())
            if outcome.state != "interrupted":
                self.record(optuna_trial(self.study, t), outcome)
            elif requeue(self.study, t, run_dir, t.user_attrs.get("lost", 0)):
                self.print(f"trial {t.number} was running when its worker stopped: queued to continue")

    def _stop_all(self) -> None:
        """Stop every trial with a checkpoint (SIGTERM), wait for them, and queue them to be continued."""
        self.stop_requested = self.stop_requested or "interrupt"
        self.print(f"sweep stopping ({self.stop_requested}): {len(self.running)} trial(s) write a checkpoint")
        for p in self.running.values():
            p.stop()
        deadline = time.time() + STOP_WAIT_S
        while any(p.process is not None and p.process.poll() is None for p in self.running.values()):
            if time.time() > deadline:
                for p in self.running.values():
                    p.kill()
            time.sleep(0.5)
        for p in list(self.running.values()):
            code = p.process.returncode if p.process is not None else None
            self._ended(p, read_outcome(p.run_dir, code, p.log, self._objective()))
        self.running.clear()


def describe_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
