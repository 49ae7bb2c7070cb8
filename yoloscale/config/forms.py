"""The text forms some keys take: batch= (a number, auto, a fraction, -1), grad_ckpt= (a named choice or layer
indices), device= (Ultralytics' forms) and freeze= (a number of layers or a list)."""

from __future__ import annotations

import re
from typing import Any

from yoloscale.config.fields import FRACTION_AUTO
from yoloscale.errors import UserError


def batch_value(value: Any, where: str) -> int | float:
    """`batch`: a whole number (kept an int), 'auto' (the fraction FRACTION_AUTO), a fraction in (0, 1), or -1."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return FRACTION_AUTO
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: key 'batch' expects a number or 'auto', got {value!r}.")
    return int(value) if float(value).is_integer() else float(value)


GRAD_CKPT_NAMES = (
    "off",
    "all",
    "backbone",
    "head",
    "highres",
    "auto",
)  # auto: resolved to layers by the planner (memory/model.py: layers_for_batch)


def parse_selection(text: str) -> str | list[int]:
    """'off' | 'all' | 'backbone' | 'head' | 'highres' | '2-8,10' (layer indices, ranges inclusive) -> a name or
    sorted indices."""
    text = str(text).strip().lower() or "off"
    if text in GRAD_CKPT_NAMES:
        return text
    if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", text.replace(" ", "")):
        raise UserError(
            f"key 'grad_ckpt' must be one of {list(GRAD_CKPT_NAMES)} or layer indices like '2-8,10', got {text!r}."
        )
    indices: set[int] = set()
    for part in text.replace(" ", "").split(","):
        lo, _, hi = part.partition("-")
        if hi and int(hi) < int(lo):
            raise UserError(f"key 'grad_ckpt': range '{part}' runs backwards.")
        indices.update(range(int(lo), int(hi or lo) + 1))
    return sorted(indices)


def parse_device(value: str) -> str | list[str]:
    """'' (the launcher's or Accelerate's choice), 'cpu', or the requested GPU indices as text ('-1': an idle one).
    Accepts Ultralytics' forms: 0, '0,1', [0, 1], 'cuda:0', 'cuda'."""
    text = str(value).lower()
    for remove in ("cuda:", "none", "(", ")", "[", "]", "'", '"', " "):
        text = text.replace(remove, "")
    if text in ("", "cpu"):
        return text
    if text == "cuda":
        return ["0"]
    ids = text.split(",")
    if not all(i.isdigit() or i == "-1" for i in ids) or ("-1" in ids and set(ids) != {"-1"}):
        raise UserError(
            f"key 'device' must be cpu, a CUDA GPU index or a list of them (0 or 0,1,2,3), or -1 for an idle GPU; "
            f"got {value!r}."
        )
    if len(set(ids)) != len(ids) and ids[0] != "-1":
        raise UserError(f"key 'device' names a GPU twice: {value!r}.")
    return ids


def frozen_prefixes(freeze: str) -> list[str]:
    """Ultralytics' freeze= as parameter-name prefixes: 'N' freezes layers 0..N-1, '[a,b,...]' (or 'a,b') those
    layers or modules ('23.cv2'); '' none."""
    text = freeze.strip().replace(" ", "")
    if not text:
        return []
    if text.isdigit():
        return [f"model.{i}." for i in range(int(text))]
    items = [i for i in text.strip("[]()").split(",") if i]
    if not items or not all(re.fullmatch(r"\d+(\.\w+)*", i) for i in items):
        raise UserError(
            f"key 'freeze' takes a number of leading layers (freeze=10) or a list of layers or modules "
            f"(freeze=[0,1,23.cv2]), got {freeze!r}."
        )
    return [f"model.{i}." for i in items]
