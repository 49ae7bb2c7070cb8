"""The package's layering: no import circles, the settings at the bottom and frozen, one run plan, and nothing outside
backend/ branching on a backend's name."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from yoloscale.config import load_config
from yoloscale.training.run_plan import make_plan, requested_device_batch

PACKAGE = Path(__file__).resolve().parents[2] / "yoloscale"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, anywhere in it (TYPE_CHECKING blocks left out); importing a.b.c
    counts as importing the packages a.b and a too, whose __init__ runs first."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        guarded = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in guarded or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom):
                names += [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                parts = name.split(".")
                for k in range(2, len(parts) + 1):
                    target = ".".join(parts[:k])
                    if target in mods and target != mod and not mod.startswith(target + "."):
                        edges[mod].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_circles():
    assert _cycles(_imports(_modules())) == []


def test_the_settings_import_nothing_of_ours_but_the_error_type():
    edges = _imports(_modules())
    for mod in (m for m in edges if m == "yoloscale.config" or m.startswith("yoloscale.config.")):
        assert {t for t in edges[mod] if not t.startswith("yoloscale.config")} <= {"yoloscale.errors"}, mod


def test_nothing_outside_backend_branches_on_a_backend_name():
    """`cfg.backend == "fsdp"` and the like belong to the backend classes (their rules, layouts and capabilities)."""
    branch = re.compile(r"backend\s*(==|!=|in)\s*\(?[\"'](ddp|fsdp|zero)|backend\.startswith\(")
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{i}"
        for path in PACKAGE.rglob("*.py")
        if "backend" not in path.relative_to(PACKAGE).parts[:1]
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if branch.search(line)
    ]
    assert offenders == []


def test_settings_are_frozen_once_parsed():
    cfg = load_config(None, ["epochs=3"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 4


def test_the_run_plan_derives_batch_accumulation_and_validation_batch_once():
    cfg = load_config(None, ["batch=32", "nbs=64", "val_batch=0"])
    assert requested_device_batch(cfg, 2) == 16
    plan = make_plan(cfg, "fp32", 2, 16, [1, 2], "1-2", batches_per_epoch=100, decided={})
    assert (plan.batch, plan.accumulate, plan.nominal_accumulate, plan.val_batch) == (32, 2, 2, 32)
    assert plan.recorded(cfg) == cfg  # nothing decided: config.yaml records the settings as given
    small = make_plan(cfg, "fp32", 2, 16, [], "off", batches_per_epoch=1, decided={})
    assert (small.accumulate, small.nominal_accumulate) == (1, 2)  # an epoch of one batch still steps


def test_an_out_of_memory_retry_makes_a_new_plan_that_config_yaml_records():
    cfg = load_config(None, ["batch=auto"])
    plan = make_plan(cfg, "fp16", 1, 48, [], "off", 100, {"device_batch": 48, "grad_ckpt": "off"})
    retry = plan.with_device_batch(24, 8)
    assert (retry.device_batch, retry.accumulate, plan.device_batch) == (24, 8, 48)  # the old plan is untouched
    recorded = retry.recorded(cfg)
    assert (recorded.device_batch, recorded.accumulate, recorded.grad_ckpt, recorded.batch) == (24, 8, "off", cfg.batch)
    with pytest.raises(dataclasses.FrozenInstanceError):
        retry.device_batch = 12
