"""A run's settings: the defaults, then an optional YAML file, then `key=value` overrides, every key and value checked,
and the combinations that cannot train refused, before anything runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from yoloscale.config.fields import FIELDS, SYNTHETIC_DEFAULTS, TrainConfig
from yoloscale.config.forms import frozen_prefixes, parse_device, parse_selection
from yoloscale.config.parse import coerce, parse_override
from yoloscale.config.ultralytics import FRACTION_KEYS, drop_not_for_training, drop_retired, ultralytics_forms
from yoloscale.errors import UserError


def _validate_compile(cfg: TrainConfig, checkpointed: bool) -> None:
    """The combinations with compile= that are tested (tests/distributed/test_backends.py, test_compile.py)."""
    if cfg.compile == "off":
        return
    if cfg.compile_scope == "model" and checkpointed:  # and a backend that shards refuses it (backend/)
        raise UserError(
            f"compile_scope=model is supported with backend=ddp and grad_ckpt=off only (got backend={cfg.backend}, "
            f"grad_ckpt={cfg.grad_ckpt}); compile_scope=layers works with both."
        )
    if checkpointed and cfg.grad_ckpt_recompute == "cheap":
        raise UserError(
            "compile= with grad_ckpt_recompute=cheap is not supported: its per-op policy cannot see inside a "
            "compiled layer; use grad_ckpt_recompute=all."
        )
    if cfg.offload != "none":
        raise UserError(f"compile= with offload={cfg.offload} is not tested; use offload=none or compile=off.")


def _validate(cfg: TrainConfig) -> None:
    positive = (
        "imgsz",
        "epochs",
        "nbs",
        "log_interval",
        "max_bad_steps",
        "keep_checkpoints",
        "dist_timeout",
        "fraction",
    )
    if not (cfg.batch >= 1 and cfg.batch == int(cfg.batch) or 0 < cfg.batch < 1 or cfg.batch == -1):
        raise UserError(f"key 'batch' must be a whole number >= 1, auto, a fraction in (0, 1) or -1; got {cfg.batch}.")
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise UserError(f"key '{key}' must be > 0, got {getattr(cfg, key)}.")
    for key in FRACTION_KEYS:
        if not 0 <= getattr(cfg, key) <= 1:
            raise UserError(f"key '{key}' must be between 0 and 1 (as in Ultralytics), got {getattr(cfg, key)}.")
    for key in (
        "accumulate",
        "device_batch",
        "workers",
        "save_steps",
        "patience",
        "val_batch",
        "close_mosaic",
        "grad_clip",
        "lr0",
        "heartbeat_s",
        "time",
        "dis",
    ):
        if getattr(cfg, key) < 0:
            raise UserError(f"key '{key}' must be >= 0, got {getattr(cfg, key)}.")
    parse_selection(cfg.grad_ckpt)  # raises UserError naming the key
    _validate_compile(cfg, parse_selection(cfg.grad_ckpt) != "off")
    name = Path(cfg.name)
    if name.is_absolute() or ".." in name.parts:
        raise UserError(f"key 'name' must be a folder inside project (no '..', not absolute), got {cfg.name!r}.")
    frozen_prefixes(cfg.freeze)  # a malformed freeze= is refused here, before anything is built
    if cfg.weights and cfg.pretrained != "True":
        raise UserError(
            f"weights= and pretrained={cfg.pretrained} both say where the initial weights come from; give one."
        )
    if cfg.weights and cfg.model.endswith(".pt"):
        raise UserError(
            f"model='{cfg.model}' already carries its weights; leave weights= empty (or give a model YAML)."
        )
    if parse_device(cfg.device) not in ("", "cpu") and cfg.cpu:  # parse_device refuses a malformed device= first
        raise UserError(f"cpu=True and device={cfg.device} disagree; give one of them.")
    if cfg.distill_model and cfg.compile != "off":
        raise UserError("distill_model= runs eagerly (Ultralytics turns compile off with it); leave compile off.")
    if cfg.imgsz % 32:
        raise UserError(f"key 'imgsz' must be a multiple of 32 (the model stride), got {cfg.imgsz}.")


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] = ()) -> TrainConfig:
    """Defaults <- YAML file <- overrides, every key and value checked."""
    values: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file '{path}' not found.")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"config file '{path}'{line}: not valid YAML ({getattr(e, 'problem', e)}).") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file '{path}': expected a mapping of key: value, got {type(loaded).__name__}.")
        loaded = drop_retired(loaded, f"config file '{path}'")
        loaded = drop_not_for_training(loaded, f"config file '{path}'")
        loaded = ultralytics_forms(loaded, f"config file '{path}'")
        values.update({k: coerce(k, v, f"config file '{path}'") for k, v in loaded.items()})
    items = dict(overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides))
    if items.get("task", "detect") == "detect":
        items.pop("task", None)  # Ultralytics' task=detect, the only one trained here
    items = ultralytics_forms(drop_retired(items, "command line"), "command line")
    values.update({k: coerce(k, v, "command line") for k, v in items.items()})
    if values.get("data", FIELDS["data"].default) == "synthetic":
        values = {**SYNTHETIC_DEFAULTS, **values}
    cfg = TrainConfig(**values)
    _validate(cfg)
    return cfg
