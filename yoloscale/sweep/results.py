"""What a sweep leaves in its folder: sweep.csv (every trial that counts, best first), best.yaml (the best trial's
training configuration: `yoloscale train best.yaml` trains it again) and Optuna's plots; and the table that
`yoloscale sweep --status DIR` prints.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import yaml

from yoloscale.sweep.study import counted

PLOTS = {  # Optuna's matplotlib visualisation: file -> function name
    "history.png": "plot_optimization_history",
    "importance.png": "plot_param_importances",
    "parallel.png": "plot_parallel_coordinate",
    "epochs.png": "plot_intermediate_values",
}


def rows(study) -> list[dict[str, Any]]:
    """One row per trial that counts, finished ones first, sorted by the objective (best first)."""
    # optuna is imported where a sweep uses it: the trainer imports sweep/trial.py, and a plain run never loads it
    from optuna.study import StudyDirection

    maximize = study.direction == StudyDirection.MAXIMIZE
    out = []
    for t in counted(study):
        value = t.value if t.values else (list(t.intermediate_values.values())[-1] if t.intermediate_values else None)
        if t.state.name != "COMPLETE":  # its last report, which may carry the val-loss tie-break (trial.py)
            value = t.user_attrs.get("objective", value)
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        out.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "value": value,
                "epochs": max(t.intermediate_values, default=0),
                "seconds": round(seconds, 1) if seconds is not None else "",
                **{f"param/{k}": v for k, v in t.params.items()},
                "continues": t.user_attrs.get("resumes", ""),  # the interrupted trial this one continued
                "run_dir": t.user_attrs.get("run_dir", ""),
                "error": t.user_attrs.get("error", ""),
            }
        )

    def key(r):
        known = r["value"] is not None and r["state"] in ("complete", "pruned") and math.isfinite(r["value"])
        rank = {"complete": 0, "pruned": 1}.get(r["state"], 2)
        return (rank, -r["value"] if known and maximize else r["value"] if known else 0.0, r["trial"])

    return sorted(out, key=key)


def best_trial(study):
    """The best COMPLETE trial (a pruned one stopped early: its value is not comparable), or None."""
    # optuna is imported where a sweep uses it: the trainer imports sweep/trial.py, and a plain run never loads it
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        return None
    return max(done, key=lambda t: t.value) if study.direction.name == "MAXIMIZE" else min(done, key=lambda t: t.value)


def write_results(study, out: Path, base_workers: int) -> list[str]:
    """sweep.csv, best.yaml and the plots; returns the lines to print."""
    table = rows(study)
    lines = []
    if table:
        fields = list(dict.fromkeys(k for r in table for k in r))
        tmp = out / ".tmp-sweep.csv"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(table)
        tmp.replace(out / "sweep.csv")  # atomic: several workers may write it at once
        lines.append(f"wrote {out / 'sweep.csv'}")
    best = best_trial(study)
    if best is not None and best.user_attrs.get("run_dir"):
        path = write_best_yaml(best, Path(best.user_attrs["run_dir"]), out / "best.yaml", study, base_workers)
        if path:
            lines.append(f"wrote {path}: yoloscale train {path} trains trial {best.number} again")
    lines += write_plots(study, out)
    return lines


def write_best_yaml(best, run_dir: Path, path: Path, study, base_workers: int) -> Path | None:
    """The trial's own config.yaml (what it trained with, the sampled values included), without its run directory,
    and with the base configuration's loader workers instead of the sweep's share of them."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return None
    config = yaml.safe_load(saved.read_text()) or {}
    for key in ("project", "name", "resume"):
        config.pop(key, None)
    config["workers"] = base_workers
    objective = study.user_attrs["identity"]["objective"]
    header = f"# the best trial ({best.number}) of the sweep in {path.parent}: val/{objective} {best.value:.5g}\n"
    tmp = path.with_name(".tmp-best.yaml")
    tmp.write_text(header + yaml.safe_dump(config, sort_keys=False))
    tmp.replace(path)
    return path


def write_plots(study, out: Path) -> list[str]:
    """Optuna's matplotlib plots; one that cannot be drawn yet (too few trials) is left out with a note."""
    # matplotlib where a chart is drawn: its Agg backend is chosen before pyplot is imported
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna  # where a sweep uses it (see above)
    import optuna.visualization.matplotlib as vis

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no complete trials" and the like: said below, once

    lines, skipped = [], []
    for name, function in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
                ax = getattr(vis, function)(study)
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            figure.savefig(out / name, dpi=110, bbox_inches="tight")
            plt.close(figure)
        except Exception as e:  # e.g. importance needs two finished trials
            skipped.append(f"{name} ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    if skipped:
        lines.append(f"plots not drawn yet: {', '.join(skipped)}")
    return lines


def status_table(study) -> str:
    """The table of `yoloscale sweep --status DIR`."""
    table = rows(study)
    if not table:
        return "no trials yet"
    params = [k for k in dict.fromkeys(k for r in table for k in r) if k.startswith("param/")]
    header = ["trial", "state", "value", "epochs", "seconds", *[p.removeprefix("param/") for p in params]]
    body = []
    for r in table:
        value = r["value"]
        cells = [r["trial"], r["state"], f"{value:.4f}" if isinstance(value, float) else "", r["epochs"], r["seconds"]]
        cells += [_cell(r.get(p)) for p in params]
        body.append([str(c) for c in cells] + ([r["error"]] if r["error"] else []))
    widths = [max(len(str(row[i])) for row in [header, *body] if i < len(row)) for i in range(len(header))]
    text = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    for row in body:
        text.append(
            "  ".join(c.ljust(w) for c, w in zip(row, widths)) + (f"  {row[-1]}" if len(row) > len(header) else "")
        )
    return "\n".join(text)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
