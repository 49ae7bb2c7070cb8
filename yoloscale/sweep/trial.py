"""One trial of a sweep: an ordinary `yoloscale train` run in its own run directory. Here: the link between that
training process and the study (the environment variable the sweep sets, read by the trainer at each epoch end), and
what the finished run directory says about the trial.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yoloscale.compat import optuna_trial
from yoloscale.sweep.study import build_pruner, open_storage
from yoloscale.training.validate import RESULT_COLUMNS

TRIAL_ENV = (
    "YOLOSCALE_SWEEP_TRIAL"  # JSON: storage, study, trial number, objective, pruner, tie_break (set by the sweep)
)


TIE_BREAK = 1e-6  # x the summed val losses (~1-20): far below any mAP difference that the study reports


def trial_link(
    storage: str, study: str, number: int, objective: str, pruner: dict[str, Any], tie_break: str = "none"
) -> str:
    """The value of TRIAL_ENV for one trial's training process."""
    link = {"storage": storage, "study": study, "number": number, "objective": objective, "pruner": pruner}
    return json.dumps({**link, "tie_break": tie_break})


class TrialReporter:
    """Inside a trial's training process (the main rank): each epoch's validation objective goes to the study as an
    intermediate value, and the study's pruner says whether the trial stops here."""

    def __init__(self, link: dict[str, Any]):
        # optuna is imported where a sweep uses it: the trainer imports sweep/trial.py, and a plain run never loads it
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.objective = link["objective"]
        self.study = optuna.load_study(
            study_name=link["study"], storage=open_storage(link["storage"]), pruner=build_pruner(**link["pruner"])
        )
        self.number = link["number"]
        self.trial = optuna_trial(self.study, self._frozen())
        # a maximised metric only: a loss objective does not tie, and lower is better there
        maximised = self.study.direction == optuna.study.StudyDirection.MAXIMIZE
        self.tie_break = link.get("tie_break") == "val_loss" and maximised and not self.objective.endswith("_loss")

    def _frozen(self):
        return next(t for t in self.study.get_trials(deepcopy=False) if t.number == self.number)

    @classmethod
    def from_environment(cls) -> TrialReporter | None:
        link = os.environ.get(TRIAL_ENV)
        return cls(json.loads(link)) if link else None

    def should_stop(self, epochs_done: int, metrics: dict[str, float]) -> bool:
        """Report the objective after `epochs_done` epochs; True when the pruner stops the trial."""
        value = metrics.get(self.objective)
        if value is None or not math.isfinite(value):
            return False
        reported = float(value)
        if self.tie_break:  # among trials tied at the same objective, the lower val loss ranks higher
            reported -= TIE_BREAK * sum(v for k, v in metrics.items() if k.endswith("_loss") and math.isfinite(v))
        if epochs_done not in self._frozen().intermediate_values:
            self.trial.report(reported, step=epochs_done)  # (a resumed trial does not report an epoch twice)
            if self.tie_break:  # a pruned trial's value is its last report (Optuna's rule): the plain one beside it
                self.trial.set_user_attr("objective", float(value))
        return self.trial.should_prune()


@dataclass
class Outcome:
    """What a trial's run says when its process has ended."""

    state: str  # complete | pruned | failed | interrupted
    value: float | None = None  # the objective after the last validated epoch
    epochs: int = 0  # epochs trained
    error: str = ""  # failed: the one-line reason


def last_value(run_dir: Path, objective: str) -> tuple[float | None, int]:
    """(the objective of the last row of results.csv that has it, the number of epochs in results.csv)."""

    path = Path(run_dir) / "results.csv"
    if not path.is_file():
        return None, 0
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    column = RESULT_COLUMNS.get(objective, f"val/{objective}")
    values = [float(r[column]) for r in rows if r.get(column) not in (None, "")]
    return (values[-1] if values else None), (int(rows[-1]["epoch"]) if rows else 0)


def read_outcome(run_dir: Path | None, returncode: int | None, log: Path, objective: str) -> Outcome:
    """A trial's outcome from its exit code, its log and its run directory (run_info.json says whether training
    finished and whether the pruner stopped it)."""
    info = {}
    if run_dir is not None and (Path(run_dir) / "run_info.json").is_file():
        info = json.loads((Path(run_dir) / "run_info.json").read_text())
    if info.get("finished"):
        value, epochs = last_value(run_dir, objective)
        if value is None or not math.isfinite(value):
            return Outcome("failed", None, epochs, f"no finite {objective} in {run_dir}/results.csv")
        return Outcome("pruned" if info.get("pruned_at_epoch") else "complete", value, epochs)
    if returncode in (None, 0, -15, 143):  # still running when stopped, or stopped by a signal with its checkpoint
        return Outcome("interrupted", epochs=last_value(run_dir, objective)[1] if run_dir else 0)
    return Outcome("failed", None, 0, error_line(log, returncode))


def error_line(log: Path, returncode: int) -> str:
    """The one-line error a failed trial printed (`yoloscale: error: ...`), else the last line of its log."""
    try:
        lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    ours = [line for line in lines if line.startswith("yoloscale: error:")]
    line = ours[-1].removeprefix("yoloscale: error:").strip() if ours else (lines[-1] if lines else "")
    return f"{line or 'no output'} (exit code {returncode}; log {log})"
