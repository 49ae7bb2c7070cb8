"""`yoloscale race panel=default|FILE.yaml [repeats=N]`: several races in one command, and what tells trainers apart.

A panel is a YAML mapping; `default` is:

    data: synthetic-hard        # or a data.yaml; synthetic-hard writes the hard synthetic set once, into OUT/data
    images: 1600                # synthetic-hard: train images (val: a fifth of it)
    common: {epochs: 6, batch: 32, workers: 14, cache: ram}
    cases:
      - {name: x640, model: yolo11x.yaml, imgsz: 640}
      - {name: l512, model: yolo11l.yaml, imgsz: 512}
      - {name: s320, model: yolov8s.yaml, imgsz: 320}

Each case runs `repeats` races (seed 0, 1, ...; both sides get the same seed), each a whole `yoloscale race` in
OUT/<case>-<seed>/. Settings: the panel's `common`, then the case's keys, then the command line's (which apply to
every case). Printed and written to OUT/panel.json, per case: the wall-clock ratio of each repeat, both sides' time
to the first optimizer step, the mAP50-95 gap (ours minus Ultralytics') after each epoch, and the final mAP50-95.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from yoloscale.commands.race import race
from yoloscale.config import parse_override
from yoloscale.errors import UserError
from yoloscale.training.synth import write_synthetic_dataset

DEFAULT = {
    "data": "synthetic-hard",
    "images": 1600,
    "common": {"epochs": 6, "batch": 32, "workers": 14, "cache": "ram"},
    "cases": [
        {"name": "x640", "model": "yolo11x.yaml", "imgsz": 640},
        {"name": "l512", "model": "yolo11l.yaml", "imgsz": 512},
        {"name": "s320", "model": "yolov8s.yaml", "imgsz": 320},
    ],
}


def read_panel(spec: str) -> dict[str, Any]:
    if spec == "default":
        return DEFAULT
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"race: panel file '{spec}' not found (or give panel=default).")
    try:
        panel = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"race: panel file '{spec}' is not valid YAML ({getattr(e, 'problem', e)}).") from None
    cases = panel.get("cases") if isinstance(panel, dict) else None
    if not isinstance(cases, list) or not cases or not all(isinstance(c, dict) and c.get("name") for c in cases):
        raise UserError(f"race: panel file '{spec}' needs 'cases': a list of mappings, each with a 'name'.")
    return panel


def _given(settings: dict[str, Any]) -> list[str]:
    return [f"{k}={v}" for k, v in settings.items()]


def _data(panel: dict, given: dict[str, str], out: Path, cases: list[dict]) -> str | None:
    """The data.yaml every case trains on: the command line's, the panel's, or the hard set written once."""
    if "data" in given:
        return None  # the command line's applies as it is
    data = str(panel.get("data", "synthetic-hard"))
    if data != "synthetic-hard":
        return data
    images = int(panel.get("images", 1600))
    size = max(int(c.get("imgsz", given.get("imgsz", 640))) for c in cases)
    print(f"panel: writing the hard synthetic set ({images} train images, {size} px) into {out / 'data'}", flush=True)
    return str(write_synthetic_dataset(out / "data", images, max(images // 5, 1), size, mode="hard"))


def run_panel(cfg_file: str | None, given: list[str], settings: dict[str, Any]) -> dict:
    panel = read_panel(settings["panel"])
    out = Path(settings["out"])
    if out.exists() and any(out.iterdir()):
        raise UserError(f"race: '{out}' already holds results; it is never overwritten. Choose another out=.")
    out.mkdir(parents=True, exist_ok=True)
    command = dict(parse_override(a) for a in given)
    data = _data(panel, command, out, panel["cases"])
    results: dict[str, list[dict]] = {}
    for case in panel["cases"]:
        name = str(case["name"])
        for seed in range(settings["repeats"]):
            keys = {**panel.get("common", {}), **{k: v for k, v in case.items() if k != "name"}}
            keys = {**keys, **({"data": data} if data else {}), "seed": seed, **command}
            print(f"panel: {name}, seed {seed}", flush=True)
            race_out = {**settings, "out": str(out / f"{name}-{seed}")}
            results.setdefault(name, []).append(race(cfg_file, _given(keys), race_out))
    summary = {"panel": panel, "repeats": settings["repeats"], "cases": {n: summarise(r) for n, r in results.items()}}
    (out / "panel.json").write_text(json.dumps(summary, indent=1))
    print(table(summary))
    return summary


def summarise(races: list[dict]) -> dict:
    """What tells the two trainers apart in a case's repeats (both sides must have run)."""
    both = [r["sides"] for r in races if {"ultralytics", "yoloscale"} <= set(r["sides"])]
    if not both:
        return {}
    ratios = [s["yoloscale"]["wall_s"] / s["ultralytics"]["wall_s"] for s in both]
    epochs = min(len(s[side]["epochs"]) for s in both for side in ("ultralytics", "yoloscale"))
    gaps = [
        statistics.mean(
            s["yoloscale"]["epochs"][e]["map50_95"] - s["ultralytics"]["epochs"][e]["map50_95"] for s in both
        )
        for e in range(epochs)
    ]

    def mean(side: str, key: str) -> float | None:
        values = [s[side][key] for s in both if s[side].get(key) is not None]
        return statistics.mean(values) if values else None

    return {
        "wall_ratio": ratios,
        "wall_s": {side: mean(side, "wall_s") for side in ("ultralytics", "yoloscale")},
        "first_step_s": {side: mean(side, "first_step_s") for side in ("ultralytics", "yoloscale")},
        "map_gap_by_epoch": gaps,
        "final_map50_95": {
            side: statistics.mean(s[side]["epochs"][-1]["map50_95"] for s in both)
            for side in ("ultralytics", "yoloscale")
        },
    }


def table(summary: dict) -> str:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [
        f"{'case':<8}{'wall ratio (each repeat)':<26}{'1st step s UL / ours':>22}{'final mAP UL / ours':>22}"
        "  mAP gap by epoch (ours - UL)"
    ]
    for name, c in summary["cases"].items():
        if not c:
            lines.append(f"{name:<8}(one side only)")
            continue
        ratios = " ".join(f"{r:.2f}x" for r in c["wall_ratio"])
        first = f"{fmt(c['first_step_s']['ultralytics'], '.1f')} / {fmt(c['first_step_s']['yoloscale'], '.1f')}"
        final = f"{c['final_map50_95']['ultralytics']:.3f} / {c['final_map50_95']['yoloscale']:.3f}"
        gaps = " ".join(f"{g:+.3f}" for g in c["map_gap_by_epoch"])
        lines.append(f"{name:<8}{ratios:<26}{first:>22}{final:>22}  {gaps}")
    return "\n".join(lines)
