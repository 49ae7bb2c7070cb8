"""The training settings a command is given: every key and value checked (config/), then the rules of the backend
they name (backend/), before the command starts anything."""

from __future__ import annotations

from pathlib import Path

from yoloscale import backend
from yoloscale.config import TrainConfig, load_config


def training_config(cfg_file: str | Path | None, overrides: list[str] | dict) -> TrainConfig:
    cfg = load_config(cfg_file, overrides)
    backend.get(cfg)  # refuses what the backend cannot honour (offload, ds_config, sync_bn, ...)
    return cfg
