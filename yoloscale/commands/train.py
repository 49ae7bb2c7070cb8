"""`yoloscale train [config.yaml] [key=value ...]`: train here, or, for device= naming several GPUs without a
launcher around the command, start torchrun's processes (one per GPU, as Ultralytics does) and wait for them."""

from __future__ import annotations

import os

import yaml

from yoloscale.backend.zero import stage_of_file
from yoloscale.commands.settings import training_config
from yoloscale.config import TrainConfig, parse_override
from yoloscale.distributed.devices import launcher_started_fewer, place
from yoloscale.errors import UserError, warn
from yoloscale.training.run_dir import resolve_resume
from yoloscale.training.trainer import Trainer


def _with_deepspeed_file(cfg_file: str | None, overrides: list[str], ds_file: str) -> list[str]:
    """`--deepspeed FILE` from DeepSpeed's launcher: our ds_config, and the backend the file's ZeRO stage names
    unless the configuration names one itself (then they must agree)."""
    if not os.path.isfile(ds_file):
        raise UserError(
            f"--deepspeed '{ds_file}' not found (the templates: ds_configs/ in the repository, or "
            "`yoloscale launch templates out=DIR` from an installed package)."
        )
    stage = stage_of_file(ds_file)
    if stage not in (1, 2, 3):
        raise UserError(
            f"--deepspeed '{ds_file}': not a readable DeepSpeed JSON with zero_optimization.stage 1, 2 or 3."
        )
    given = dict(parse_override(a) for a in overrides)
    if cfg_file and "backend" not in given and os.path.isfile(cfg_file):
        try:
            given.update(yaml.safe_load(open(cfg_file)) or {})
        except (yaml.YAMLError, ValueError, TypeError):
            pass  # load_config reports a broken file with its line
    if "backend" in given and given["backend"] != f"zero{stage}":
        raise UserError(
            f"--deepspeed '{ds_file}' asks for ZeRO stage {stage} but our configuration says "
            f"backend={given['backend']}; make them agree."
        )
    return [*overrides, f"backend=zero{stage}", f"ds_config={ds_file}"]


def train(args: list[str], ds_file: str | None = None) -> int:
    """Train here, or (device= naming several GPUs, no launcher around us) start torchrun's processes and wait."""
    cfg = train_config(args, ds_file)
    if fewer := launcher_started_fewer():
        warn(fewer)
    launched = place(cfg.device, [*args, *(["--deepspeed", ds_file] if ds_file else [])])
    if launched is not None:
        return launched
    Trainer(cfg).train()
    return 0


def train_config(args: list[str], ds_file: str | None = None) -> TrainConfig:
    """`yoloscale train`'s arguments -> the run's configuration (a resume's: the run's own, with the overrides)."""
    args = ["resume=auto" if a == "resume" else a for a in args]  # Ultralytics' bare `resume`
    cfg_file = args[0] if args and "=" not in args[0] else None
    overrides = args[1:] if cfg_file else args
    if cfg_file and not cfg_file.endswith((".yaml", ".yml")):
        raise UserError(f"'{cfg_file}' is neither a YAML config file nor key=value.")
    if ds_file:
        overrides = _with_deepspeed_file(cfg_file, overrides, ds_file)
    cfg = training_config(cfg_file, overrides)
    if cfg.resume:
        cfg, _, _ = resolve_resume(cfg, overrides)
    return cfg
