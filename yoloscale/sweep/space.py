"""The search space of a sweep: `space.yaml` read into Optuna distributions, every key and value checked against the
training configuration before a trial starts.

    lr0: {type: float, low: 0.001, high: 0.02, log: true}    # float: uniform, or log-uniform; optional step
    imgsz: {type: int, low: 320, high: 640, step: 32}        # int: optional step or log
    fliplr: [0.0, 0.5]                                       # a list: categorical choices
    model: {type: categorical, choices: [yolo11n.yaml, yolo11s.yaml]}

With `sampler=grid` every value of every key is tried: lists as they are, ranges need a `step`.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from yoloscale.config import FIELDS, coerce, suggest
from yoloscale.errors import UserError

# what a trial's run directory and the sweep itself decide; a search space cannot vary them
NOT_SWEPT = ("project", "name", "resume")
# optimizer=auto chooses these itself (Ultralytics' rule), so sweeping them under auto would be silently ignored
SET_BY_AUTO = ("lr0", "momentum", "warmup_bias_lr")
KINDS = ("float", "int", "categorical")


@dataclass
class SearchSpace:
    """name -> Optuna distribution, in the file's order."""

    distributions: dict[str, Any]
    source: str  # the file's text: a rerun of the sweep must search the same space

    def grid(self, where: str) -> dict[str, list]:
        """Every value of every key, for Optuna's GridSampler."""
        # optuna is imported where a sweep uses it: the trainer imports sweep/trial.py, and a plain run never loads it
        from optuna.distributions import CategoricalDistribution

        grid = {}
        for key, d in self.distributions.items():
            if isinstance(d, CategoricalDistribution):
                grid[key] = list(d.choices)
            elif d.step is None:
                raise UserError(f"{where}: key '{key}': sampler=grid needs a list of values or a step.")
            else:
                n = int(round((d.high - d.low) / d.step)) + 1
                grid[key] = [d.low + i * d.step for i in range(n)]
                if isinstance(d.low, int):
                    grid[key] = [int(v) for v in grid[key]]
        return grid

    def grid_size(self, where: str) -> int:
        return math.prod(len(v) for v in self.grid(where).values())


def override(key: str, value: Any) -> str:
    """A sampled value as the `key=value` of a `yoloscale train` command line (floats in full precision)."""
    if isinstance(value, float):
        return f"{key}={value!r}"
    return f"{key}={value}"


def _key_lines(text: str) -> dict[str, int]:
    """The line of each top-level key of a YAML mapping, for messages that name it."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def load_space(path: str | Path) -> SearchSpace:
    """Read and check `space.yaml`: every key a training key, every bound or choice a valid value of it."""
    # optuna is imported where a sweep uses it: the trainer imports sweep/trial.py, and a plain run never loads it
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    path = Path(path)
    where = f"search space '{path}'"
    if not path.is_file():
        raise UserError(f"{where} not found.")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{where}{line}: not valid YAML ({getattr(e, 'problem', e)}).") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: expected a mapping of training key -> range or list of choices.")
    distributions: dict[str, Any] = {}
    lines = _key_lines(text)
    for key, spec in raw.items():
        at = f"{where} line {lines[key]}" if key in lines else where  # what coerce's messages name
        if key not in FIELDS:
            raise UserError(f"{at}: unknown training key '{key}'.{suggest(key)}")
        if key in NOT_SWEPT:
            raise UserError(f"{at}: key '{key}' is set by the sweep for each trial and cannot be searched.")
        here = f"{at}, key '{key}'"
        if isinstance(spec, list):
            spec = {"type": "categorical", "choices": spec}
        if not isinstance(spec, dict) or spec.get("type") not in KINDS:
            kind = spec.get("type") if isinstance(spec, dict) else None
            close = difflib.get_close_matches(str(kind), KINDS, n=1) if isinstance(kind, str) else []
            raise UserError(
                f"{here}: give a list of choices or a mapping with type: {' | '.join(KINDS)} "
                f"(e.g. {{type: float, low: 0.001, high: 0.02, log: true}}), got {spec!r}."
                + (f" Did you mean type: {close[0]}?" if close else "")
            )
        kind = spec["type"]
        allowed = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"}}
        allowed["categorical"] = {"choices"}
        extra = set(spec) - allowed[kind] - {"type"}
        if extra:
            raise UserError(
                f"{here}: unknown field(s) {sorted(extra)} for type {kind}; allowed: {sorted(allowed[kind])}."
            )
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise UserError(f"{here}: choices must be a non-empty list.")
            values = tuple(coerce(key, c, at) for c in choices)
            distributions[key] = CategoricalDistribution(values)
            continue
        if "low" not in spec or "high" not in spec:
            raise UserError(f"{here}: type {kind} needs low and high.")
        low, high = (coerce(key, spec[b], at) for b in ("low", "high"))
        if kind == "int" and not all(
            isinstance(v, int) and not isinstance(v, bool) for v in (spec["low"], spec["high"])
        ):
            raise UserError(f"{here}: type int needs whole numbers for low and high.")
        if not isinstance(low, (int, float)) or isinstance(low, bool):
            raise UserError(f"{here}: '{key}' is not a numeric key; give a list of choices.")
        if not low < high:
            raise UserError(f"{here}: low ({low}) must be below high ({high}).")
        log, step = bool(spec.get("log", False)), spec.get("step")
        if log and low <= 0:
            raise UserError(f"{here}: log: true needs low > 0.")
        if log and step is not None:
            raise UserError(f"{here}: give either log: true or a step, not both.")
        if step is not None and (not isinstance(step, (int, float)) or step <= 0):
            raise UserError(f"{here}: step must be a positive number.")
        if kind == "int":
            distributions[key] = IntDistribution(int(low), int(high), log=log, step=int(step or 1))
        else:
            distributions[key] = FloatDistribution(float(low), float(high), log=log, step=step)
    return SearchSpace(distributions, text)


def check_with_base(space: SearchSpace, optimizer: str, where: str) -> None:
    """Refuse a space whose values the base configuration would ignore."""
    # optuna is imported where a sweep uses it: the trainer imports sweep/trial.py, and a plain run never loads it
    from optuna.distributions import CategoricalDistribution

    opt = space.distributions.get("optimizer")
    auto = optimizer == "auto" if opt is None else isinstance(opt, CategoricalDistribution) and "auto" in opt.choices
    ignored = [k for k in SET_BY_AUTO if k in space.distributions]
    if auto and ignored:
        raise UserError(
            f"{where}: {', '.join(ignored)} in the search space, but optimizer=auto picks its own lr0 and momentum "
            "(Ultralytics' rule) and would ignore the sampled values; set optimizer=SGD, AdamW or MuSGD."
        )
