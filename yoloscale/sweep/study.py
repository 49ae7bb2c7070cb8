"""The sweep's Optuna study: where it is stored, its sampler and pruner, and the bookkeeping that lets several workers
(processes, nodes, Slurm array tasks) share one study and survive each other's deaths.

Which trials count. A trial that was running when its worker died is marked `interrupted` (its state FAIL) and
a copy with the same parameters is queued that resumes the old trial's run directory from its checkpoint, so the
study still ends with exactly `trials` trials that count: COMPLETE, PRUNED, FAIL (an error) and the queued or running
ones. A trial asked for after the budget was filled by another worker at the same moment is marked `surplus`.

Who owns a running trial. The worker that asked for it records itself (`worker`: host, pid, process start time) and
refreshes a `heartbeat` every HEARTBEAT_S. A trial is stale when its worker is gone: on the same host, its process
no longer exists; elsewhere, no heartbeat for STALE_S. Optuna's journal storage has no heartbeat of its own (its RDB
storage has one, which the journal cannot use), so these are trial user attributes.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import psutil

from yoloscale.compat import optuna_trial
from yoloscale.errors import UserError

HEARTBEAT_S = 30.0
STALE_S = 300.0  # a worker on another host that has not been heard of for this long is taken as dead
RDB_PREFIXES = ("sqlite:", "postgresql", "mysql", "oracle", "mssql")


def open_storage(spec: str):
    """`storage=`: an Optuna RDB URL (sqlite:///..., postgresql://...) or the path of a journal file (the default:
    the sweep folder's study.journal; on a shared filesystem it serves any number of nodes)."""
    # optuna is imported where a sweep uses it: the trainer imports sweep/trial.py, and a plain run never loads it
    import optuna

    if spec.startswith(RDB_PREFIXES):
        try:
            return optuna.storages.RDBStorage(spec)
        except Exception as e:  # a bad URL, a missing driver, an unreachable server
            raise UserError(f"storage={spec}: cannot open the database ({type(e).__name__}: {e}).") from None
    # optuna is imported where a sweep uses it: the trainer imports sweep/trial.py, and a plain run never loads it
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = Path(spec)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as e:
        raise UserError(f"storage={spec}: cannot open the journal file ({e.strerror}).") from None


def build_sampler(name: str, seed: int, grid: dict[str, list] | None):
    # optuna is imported where a sweep uses it: the trainer imports sweep/trial.py, and a plain run never loads it
    import optuna

    if name == "grid":

        class GridSampler(optuna.samplers.GridSampler):
            """Optuna's, without its end of `study.optimize()` when the grid is used up (study.stop(), which
            raises under ask-and-tell); the sweep's budget is capped at the grid's size instead."""

            def after_trial(self, study, trial, state, values) -> None:
                pass

        return GridSampler(grid, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: trials running at the same time are not all sent to the same promising point
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def build_pruner(name: str, after: int, startup: int):
    """`pruner=median`: stop a trial whose best objective so far is worse than the median of the finished trials at
    the same epoch; `halving`: successive halving (asynchronous, ASHA); `none`."""
    # optuna is imported where a sweep uses it: the trainer imports sweep/trial.py, and a plain run never loads it
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=after)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(after, 1), reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(storage, name: str, direction: str, identity: dict[str, Any], sampler, pruner, where: str):
    """Create the study, or continue it: then it must be the same sweep (search space, base configuration and
    objective: `identity`), so that a rerun never mixes two experiments. Changing the budget or the GPUs is fine."""
    # optuna is imported where a sweep uses it: the trainer imports sweep/trial.py, and a plain run never loads it
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own line per trial
    study = optuna.create_study(
        storage=storage, study_name=name, direction=direction, sampler=sampler, pruner=pruner, load_if_exists=True
    )
    saved = study.user_attrs.get("identity")
    if saved is None:
        study.set_user_attr("identity", json.loads(json.dumps(identity)))
    elif saved != json.loads(json.dumps(identity)):
        changed = sorted(k for k in {*saved, *identity} if saved.get(k) != json.loads(json.dumps(identity)).get(k))
        raise UserError(
            f"{where} already holds the sweep '{name}' with another {', '.join(changed)}; "
            "run the same sweep to continue it, or choose another out= (or study=)."
        )
    return study


def counted(study) -> list:
    """The trials that count towards the budget (see the module's docstring)."""
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if not (t.user_attrs.get("interrupted") or t.user_attrs.get("surplus"))
    ]


def this_worker() -> dict[str, Any]:

    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": round(psutil.Process().create_time(), 2),
        "task": int(task) if task else None,
    }


def is_stale(trial, now: float | None = None) -> bool:
    """A RUNNING trial whose worker is gone (see the module's docstring)."""

    now = time.time() if now is None else now
    worker = trial.user_attrs.get("worker")
    if worker is None:  # asked for, but the worker died before it could say so
        return now - trial.datetime_start.timestamp() > STALE_S
    if worker["host"] == socket.gethostname():
        try:
            return round(psutil.Process(worker["pid"]).create_time(), 2) != worker["start"]
        except psutil.Error:
            return True
    return now - trial.user_attrs.get("heartbeat", 0.0) > STALE_S


def requeue(study, trial, run_dir: str | None, lost: int = 0) -> bool:
    """Mark a trial that did not end as interrupted and queue its continuation (which resumes `run_dir` when it
    holds a checkpoint). False when another worker did it first: finishing the trial is the atomic claim."""
    # optuna is imported where a sweep uses it: the trainer imports sweep/trial.py, and a plain run never loads it
    from optuna.trial import TrialState

    try:
        optuna_trial(study, trial).set_user_attr("interrupted", True)
        study.tell(trial.number, state=TrialState.FAIL)
    except Exception:  # already finished by another worker (Optuna raises UpdateFinishedTrialError or ValueError)
        return False
    study.enqueue_trial(trial.params, user_attrs={"resumes": trial.number, "resume_dir": run_dir, "lost": lost})
    return True
