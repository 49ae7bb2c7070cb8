"""`yoloscale sweep space.yaml [base.yaml] [key=value ...]`: the command, its settings, and what one worker does:
check everything, open (or continue) the study, run trials in the node's slots, write the results.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from yoloscale.checkpoint import complete_checkpoints
from yoloscale.commands.settings import training_config
from yoloscale.config import parse_command, setting
from yoloscale.errors import UserError
from yoloscale.sweep.packing import auto_trials_per_gpu
from yoloscale.sweep.results import status_table, write_results
from yoloscale.sweep.scheduler import Scheduler, TrialProcess, describe_params, make_slots, slot_devices
from yoloscale.sweep.space import check_with_base, load_space, override
from yoloscale.sweep.study import RDB_PREFIXES, build_pruner, build_sampler, open_storage, open_study
from yoloscale.sweep.trial import trial_link
from yoloscale.training.preemption import requeue_slurm_job


@dataclass
class SweepSettings:
    out: str = setting(
        "runs/sweep",
        "The sweep's folder: study.journal, trials/ (one run directory per trial), logs/, sweep.csv, best.yaml and "
        "the plots. Running the same command again continues the sweep in it.",
    )
    trials: int = setting(20, "Trials in the study, counting finished, pruned, failed and running ones (all workers).")
    sampler: str = setting(
        "tpe",
        "Optuna's sampler: tpe, random, or grid (every combination; ranges need a step).",
        ("tpe", "random", "grid"),
    )
    pruner: str = setting(
        "median",
        "Early stopping by the per-epoch objective: median (below the finished trials' median at the same epoch), "
        "halving (successive halving) or none.",
        ("median", "halving", "none"),
    )
    prune_after: int = setting(1, "Epochs every trial trains before the pruner may stop it.")
    prune_startup: int = setting(3, "pruner=median: finished trials before pruning starts.")
    tie_break: str = setting(
        "val_loss",
        "What ranks trials for the pruner while their objective ties (from scratch every trial is at mAP 0 for its "
        "first epochs): val_loss (it is given objective - 1e-6 x the summed val losses; a finished trial's value "
        "is the plain objective) or none.",
        ("val_loss", "none"),
    )
    objective: str = setting(
        "mAP50-95",
        "The validation metric to optimise, a column of results.csv: mAP50-95, mAP50, precision, recall, "
        "fitness, or a val loss (with direction=minimize); the last validated epoch's value counts.",
    )
    direction: str = setting("maximize", "maximize or minimize the objective.", ("maximize", "minimize"))
    gpus: str = setting(
        "auto", "GPUs of this node for trials: auto (all visible ones, or the CPU), cpu, or a list 0,1,2,3."
    )
    trials_per_gpu: str = setting(
        "1",
        "Trials side by side on each GPU (or on the CPU); auto: as many as fit in the GPU's memory by the plan of the "
        "largest trial the search space can sample (yoloscale plan's memory model), at most 8 and 2 cores each.",
    )
    gpus_per_trial: int = setting(1, "GPUs of one trial (DDP with torchrun); on the CPU, processes of one trial.")
    storage: str = setting(
        "",
        "The study's storage: empty for OUT/study.journal (a journal file; on a shared filesystem any number of "
        "workers can share it), another journal file path, or an Optuna RDB URL (sqlite:///..., postgresql://...).",
    )
    study: str = setting("", "The study's name in the storage; empty: the out folder's name.")
    sampler_seed: int = setting(0, "Seed of the sampler (a Slurm array task adds its index, so tasks sample apart).")


METRICS = ("mAP50-95", "mAP50", "precision", "recall", "fitness")


def split_args(args: list[str]) -> tuple[str, list[str]]:
    if not args or "=" in args[0] or not args[0].endswith((".yaml", ".yml")):
        raise UserError(
            "sweep: give the search space first: yoloscale sweep space.yaml [base.yaml] [key=value ...] "
            "(or --status DIR to print a sweep's table)."
        )
    return args[0], args[1:]


def check_sweep(args: list[str]):
    """Everything checked before anything starts: (settings, config file, training keys, search space, base
    configuration)."""

    space_file, rest = split_args(args)
    settings, cfg_file, train_args = parse_command(SweepSettings, rest, "sweep")
    space = load_space(space_file)
    base = training_config(cfg_file, train_args)  # every training key and value, and the backend's rules
    check_with_base(space, base.optimizer, f"search space '{space_file}'")
    if base.resume:
        raise UserError("sweep: leave resume= out; running the same sweep again continues its trials.")
    if settings.trials < 1:
        raise UserError(f"sweep: trials={settings.trials} must be >= 1.")
    settings.trials_per_gpu = str(settings.trials_per_gpu).strip().lower()
    if settings.trials_per_gpu != "auto" and not settings.trials_per_gpu.isdigit():
        raise UserError(f"sweep: trials_per_gpu={settings.trials_per_gpu!r}; give a number >= 1 or auto.")
    if settings.objective not in METRICS and not settings.objective.endswith("_loss"):
        raise UserError(
            f"sweep: objective={settings.objective!r}; choose one of {', '.join(METRICS)} or a val loss (box_loss, ...)."
        )
    if settings.sampler == "grid":
        size = space.grid_size(f"search space '{space_file}'")
        if settings.trials > size:
            print(f"sampler=grid: {size} combinations, so {size} trials")
            settings.trials = size
    return settings, cfg_file, train_args, space, base


def run(args: list[str], status: str | None = None) -> None:
    """The whole command; `status` prints a sweep's table instead."""
    if status:
        print_status(Path(status))
        return
    settings, cfg_file, train_args, space, base = check_sweep(args)
    grid = space.grid("search space") if settings.sampler == "grid" else None
    Worker(settings, space, cfg_file, train_args, base, grid).run()


def print_status(out: Path) -> None:
    # optuna is imported where a sweep uses it: the trainer imports sweep/trial.py, and a plain run never loads it
    import optuna

    journal = out / "study.journal"
    spec = (out / "storage.txt").read_text().strip() if (out / "storage.txt").is_file() else str(journal)
    if not (out / "storage.txt").is_file() and not journal.is_file():
        raise UserError(f"sweep --status: '{out}' holds no sweep (no study.journal or storage.txt).")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(spec)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    name = (out / "study.txt").read_text().strip() if (out / "study.txt").is_file() else out.name
    if name not in names:
        raise UserError(f"sweep --status: no study '{name}' in {spec} (it holds {names}).")
    study = optuna.load_study(study_name=name, storage=storage)
    done = {s: sum(1 for t in study.get_trials(deepcopy=False) if t.state.name == s) for s in ("RUNNING", "WAITING")}
    print(
        f"sweep {out}: study '{name}', {len(study.trials)} trial(s) in the storage "
        f"({done['RUNNING']} running, {done['WAITING']} queued)"
    )
    print(status_table(study))


def check_out(out: Path) -> None:
    """A sweep folder is new, empty or a sweep's own (its study, or the job-array script that starts it): a folder
    that holds anything else is refused, never written into."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if any((out / f).is_file() for f in ("study.txt", "study.journal")) or any(out.glob("*-array.sbatch")):
        return
    raise UserError(f"out={out} holds other files and no sweep; choose another out= (it is never overwritten).")


class Worker:
    """One sweep process on one node."""

    def __init__(self, settings: SweepSettings, space, cfg_file: str | None, train_args: list[str], base, grid):
        self.s, self.space, self.base, self.grid = settings, space, base, grid
        self.cfg_file = str(Path(cfg_file).resolve()) if cfg_file else None
        self.train_args = train_args
        self.out = Path(settings.out).resolve()
        storage = settings.storage or str(self.out / "study.journal")
        self.storage_spec = storage if storage.startswith(RDB_PREFIXES) else str(Path(storage).resolve())
        self.study_name = settings.study or self.out.name

    def trials_per_gpu(self) -> int:
        """trials_per_gpu, auto resolved by the plan of the largest trial (packing.py)."""
        if self.s.trials_per_gpu != "auto":
            return int(self.s.trials_per_gpu)

        cores = len(os.sched_getaffinity(0))
        devices = slot_devices(self.s.gpus)
        n, why = auto_trials_per_gpu(self.base, self.space.distributions, devices, self.s.gpus_per_trial, cores)
        print(why)
        return n

    def run(self) -> None:

        s = self.s
        sys.stdout.reconfigure(line_buffering=True)  # a line per trial event, also into a Slurm log file
        check_out(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "storage.txt").write_text(self.storage_spec + "\n")  # for --status
        (self.out / "study.txt").write_text(self.study_name + "\n")
        slots = make_slots(s.gpus, self.trials_per_gpu(), s.gpus_per_trial, self.base.workers)
        task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0") or 0)
        self.pruner = {"name": s.pruner, "after": s.prune_after, "startup": s.prune_startup}
        identity = {
            "space": self.space.source,
            "base": self.base.to_dict(),
            "objective": s.objective,
            "direction": s.direction,
            "sampler": s.sampler,
        }
        self.study = open_study(
            open_storage(self.storage_spec),
            self.study_name,
            s.direction,
            identity,
            build_sampler(s.sampler, s.sampler_seed + task, self.grid),
            build_pruner(**self.pruner),
            f"out={self.out}",
        )
        print(
            f"sweep {self.study_name}: {s.trials} trials ({len(self.study.trials)} in the study so far), "
            f"{len(slots)} at once here on {', '.join(sorted({sl.describe() for sl in slots}))}; storage {self.storage_spec}"
        )
        scheduler = Scheduler(self.study, self.space.distributions, s.trials, slots, self.start_trial, self.record)
        scheduler.recover_stale()
        scheduler.run()
        for line in write_results(self.study, self.out, self.base.workers):
            print(line)

        print(status_table(self.study))
        if scheduler.stop_requested:
            print(f"sweep stopped by {scheduler.stop_requested}: run the same command to continue it")
        if scheduler.stop_requested == "SIGUSR1":  # Slurm's warning before the time limit
            requeued = requeue_slurm_job()
            if requeued:
                print(requeued)

    def start_trial(self, trial, slot):
        """The training process of a trial: a fresh run, or the continuation of an interrupted one."""

        resumes, resume_dir = trial.user_attrs.get("resumes"), trial.user_attrs.get("resume_dir")
        if resume_dir and complete_checkpoints(Path(resume_dir)):
            # the old trial's epochs first, so the pruner compares the whole curve
            old = next(t for t in self.study.get_trials(deepcopy=False) if t.number == resumes)
            for step, value in sorted(old.intermediate_values.items()):
                trial.report(value, step)
            run_dir, args = Path(resume_dir), [f"resume={resume_dir}"]
            what = f"continues trial {resumes} from {run_dir}"
        else:  # a fresh run; also a trial interrupted before its first checkpoint starts over
            run_dir = self.out / "trials" / f"trial_{trial.number:04d}"
            params = [override(k, v) for k, v in trial.params.items()]
            args = [*([self.cfg_file] if self.cfg_file else []), *self.train_args, *params]
            args += [f"project={run_dir.parent}", f"name={run_dir.name}", "exist_ok=True"]  # this folder exactly
            what = describe_params(trial.params)
            if resumes is not None:
                what += f" (starts trial {resumes} over: it had no checkpoint)"
        args.append(f"workers={slot.workers}")
        trial.set_user_attr("run_dir", str(run_dir))
        link = trial_link(
            self.storage_spec, self.study_name, trial.number, self.s.objective, self.pruner, self.s.tie_break
        )
        log = self.out / "logs" / f"trial_{trial.number:04d}.log"
        print(f"trial {trial.number} on {slot.describe()}: {what} (log {log})")
        return TrialProcess(trial, slot, run_dir, args, link, log)

    def record(self, trial, outcome) -> None:
        """Tell the study how a trial ended, and say it in one line."""
        # optuna is imported where a sweep uses it: the trainer imports sweep/trial.py, and a plain run never loads it
        from optuna.trial import TrialState

        number = trial.number
        if outcome.state == "complete":
            self.study.tell(trial, outcome.value)
            print(f"trial {number} finished: val/{self.s.objective} {outcome.value:.4f} after {outcome.epochs} epochs")
        elif outcome.state == "pruned":
            self.study.tell(trial, state=TrialState.PRUNED)
            print(f"trial {number} pruned after epoch {outcome.epochs}: val/{self.s.objective} {outcome.value:.4f}")
        else:
            trial.set_user_attr("error", outcome.error)
            self.study.tell(trial, state=TrialState.FAIL)
            print(f"trial {number} failed: {outcome.error}")
