"""Run directories: where a fresh run goes (never onto an existing one) and what `resume=` points at.

RUN/config.yaml          the resolved configuration, with what the run decided itself (a resumed run starts from it)
RUN/plan.yaml            the run plan: batch per device and in all, accumulation, checkpointed layers (run_plan.py)
RUN/run_info.json        model YAML, class names and data.yaml path (what export needs)
RUN/checkpoints/step-*/  resumable checkpoints (checkpoint/)
RUN/weights/             best/last EMA weights: .safetensors and Ultralytics .pt
RUN/results.csv, RUN/args.yaml, RUN/results.png
"""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import json
import os
import socket
from pathlib import Path
from typing import Any

from yoloscale.checkpoint import complete_checkpoints, find_checkpoint
from yoloscale.config import TrainConfig, load_config, parse_override
from yoloscale.errors import UserError

LOCK = ".lock"


def _holds_results(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(p.name != LOCK for p in path.iterdir()))


class RunLock:
    """An exclusive lock on a run directory for as long as this process lives (flock: the kernel releases it when the
    process dies, however it dies), so two runs can never write into one directory."""

    def __init__(self, fd: int):
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.release()


def _claim(run: Path) -> RunLock | None:
    """The run directory's lock, or None when another live process holds it."""
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot create run directory '{run}': {e.strerror}. Choose a writable project=.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return RunLock(fd)


def _mark_holder(lock: RunLock) -> None:
    os.ftruncate(lock.fd, 0)
    os.write(lock.fd, f"{os.getpid()} {socket.gethostname()}\n".encode())


def _holder(run: Path) -> str:
    try:
        pid, host = (run / LOCK).read_text().split()
        return f"process {pid} on {host}"
    except (OSError, ValueError):
        return "another process"


def _in_use_error(run: Path) -> UserError:
    return UserError(f"run directory '{run}' is in use by {_holder(run)}; choose another name=.")


def new_run_dir(cfg: TrainConfig) -> tuple[Path, RunLock]:
    """The run's directory, claimed for it: project/name (name empty: train) if free, else, as Ultralytics
    increments, the first free of name2, name3, ...; with exist_ok, project/name itself, which must not hold results
    (a run's folder is never overwritten) nor be in use."""
    root, base = Path(cfg.project), cfg.name or "train"
    if cfg.exist_ok:
        run = root / base
        if in_use(run):  # a live run, whether or not it has written results yet
            raise _in_use_error(run)
        lock = None if _holds_results(run) else _claim(run)  # a directory with results is not even locked
        if lock is None and not _holds_results(run):  # claimed by another run since the check above
            raise _in_use_error(run)
        if lock is None or _holds_results(run):  # (the second check: results written while we claimed it)
            raise UserError(
                f"run directory '{run}' already exists and holds results; it is never overwritten. "
                "Continue it with resume=auto, or leave exist_ok out for the next free name."
            )
        _mark_holder(lock)
        return run, lock
    for i in itertools.count(1):
        run = root / (base if i == 1 else f"{base}{i}")
        if _holds_results(run):
            continue
        lock = _claim(run)
        if lock is not None and not _holds_results(run):
            _mark_holder(lock)
            return run, lock
        if lock is not None:
            lock.release()
    raise AssertionError("unreachable")


def remove_unused_run_dir(run: Path, lock: RunLock) -> None:
    """Remove the run directory this process created, if the run stopped before writing anything into it (only its
    lock is there); then release the lock."""
    try:
        if not _holds_results(run):
            (run / LOCK).unlink(missing_ok=True)
            run.rmdir()
    except OSError:
        pass  # something appeared in it meanwhile: it stays
    lock.release()


def lock_run_dir(run: Path) -> RunLock:
    """The lock of an existing run directory that this process resumes."""
    lock = _claim(run)
    if lock is None:
        raise UserError(f"run directory '{run}' is in use by {_holder(run)}: it cannot be resumed while that runs.")
    _mark_holder(lock)
    return lock


def in_use(run: Path) -> bool:
    """Whether a live process holds the run directory's lock (without taking it)."""
    try:
        fd = os.open(Path(run) / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (releases the lock if it was taken here)


def resolve_resume(cfg: TrainConfig, overrides: list[str]) -> tuple[TrainConfig, Path, Path]:
    """For resume=auto|PATH: (the run's saved config + command-line overrides, run dir, checkpoint folder)."""
    if cfg.resume == "auto":
        if cfg.name:
            target = Path(cfg.project) / cfg.name
        else:  # the most recently written run of the project that can be resumed
            runs = [p for p in Path(cfg.project).glob("*") if complete_checkpoints(p)]
            if not runs:
                raise UserError(f"resume=auto: no run under '{cfg.project}' holds a complete checkpoint.")
            target = max(runs, key=lambda p: complete_checkpoints(p)[-1].stat().st_mtime)
    else:
        target = Path(cfg.resume)
        if target.is_file():  # Ultralytics' form: resume=RUN/weights/last.pt continues that run
            if target.parent.name != "weights":
                raise UserError(
                    f"resume: '{target}' is a file; give a run directory, a checkpoint folder or a run's "
                    "weights/last.pt."
                )
            target = target.parent.parent
    ckpt = find_checkpoint(target)
    run = ckpt.parent.parent
    saved = run / "config.yaml"
    if not saved.is_file():
        raise UserError(f"resume: '{saved}' is missing, so the run's configuration is unknown.")
    keep = [o for o in overrides if parse_override(o)[0] not in ("resume", "name", "project")]
    before = load_config(saved)
    resumed = dataclasses.replace(load_config(saved, keep), resume=str(ckpt), project=str(run.parent), name=run.name)
    refuse_changes(before, resumed, ckpt)
    return resumed, run, ckpt


# What a checkpoint cannot continue with: another model, data set or optimizer kind would be another run; without
# (or with) an EMA the checkpoint lacks (or holds) its state; the seed fixed the data order and the saved RNG states.
# Initial weights are not read by a resume at all. Every other key is applied to the continuing run.
FIXED_ON_RESUME = ("model", "data", "weights", "optimizer", "ema", "seed")


def changes_on_resume(before: TrainConfig, after: TrainConfig) -> dict[str, tuple]:
    """key -> (the run's value, the resume's) for every setting the resume changes."""
    ignore = ("resume", "project", "name")
    old, new = before.to_dict(), after.to_dict()
    return {k: (old[k], new[k]) for k in new if k not in ignore and old.get(k) != new[k]}


AUTO_SET = ("lr0", "momentum")  # what optimizer=auto decides instead of the settings


def describe_changes(before: TrainConfig, after: TrainConfig) -> str:
    """The log's line naming what a resume changes ('' when nothing)."""
    changes = changes_on_resume(before, after)
    if not changes:
        return ""
    auto = after.optimizer == "auto"  # which, as in a new run, chooses lr0 and momentum itself
    return "resume applies changed settings: " + ", ".join(
        f"{k} {a!r} -> {b!r}" + (" (unused: optimizer=auto chooses it)" if auto and k in AUTO_SET else "")
        for k, (a, b) in changes.items()
    )


def refuse_changes(before: TrainConfig, after: TrainConfig, ckpt: Path) -> None:
    fixed = {k: v for k, v in changes_on_resume(before, after).items() if k in FIXED_ON_RESUME}
    if fixed:
        key, (old, new) = next(iter(fixed.items()))
        raise UserError(
            f"resume: {key}={new!r} differs from the run's {key}={old!r} ({ckpt}); a resumed run keeps its "
            f"{', '.join(FIXED_ON_RESUME)}. Start a new run (name=) to change it."
        )


def write_run_info(run: Path, info: dict[str, Any]) -> None:
    (run / "run_info.json").write_text(json.dumps(info, indent=1))


def update_run_info(run: Path, **values: Any) -> None:
    path = run / "run_info.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    write_run_info(run, {**info, **values})


def read_run_info(run: Path) -> dict[str, Any]:
    path = Path(run) / "run_info.json"
    if not path.is_file():
        raise UserError(f"'{run}' is not a yoloscale run directory (no run_info.json).")
    return json.loads(path.read_text())
