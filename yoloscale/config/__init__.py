"""The single source of truth for a run's settings.

A run is described by one flat, typed `TrainConfig`. Values come from the field defaults, then an optional YAML
file, then `key=value` overrides from the command line (the Ultralytics habit). Every field carries a one-line doc
that `yoloscale train --help` prints. Unknown keys and bad values raise `UserError` naming the key (and the file)
and suggesting the closest valid key.

Keys that Ultralytics' trainer also has mean what they mean there, with its defaults (`batch` is the global batch,
`save_period` counts epochs, `optimizer=auto`, ...); what is ours has its own name (`device_batch`, `save_steps`,
`backend`, ...). The one exception is the embedded quick start: with `data=synthetic` (the default) and no `imgsz` or
`epochs` given, a small run at 160 px for 10 epochs, which trains on a 2-core CPU in a few minutes.

The settings sit at the bottom of the package: nothing here imports any other part of yoloscale but errors.py.
fields.py holds TrainConfig; forms.py the text forms of batch=, grad_ckpt=, device= and freeze=; ultralytics.py
Ultralytics' keys as they arrive; parse.py the key=value convention of every command; load.py `load_config`.
What a run derives from its settings is its plan (training/run_plan.py).
"""

from yoloscale.config.fields import (
    FIELDS,
    FRACTION_AUTO,
    FRACTION_ULTRALYTICS,
    OPTIMIZERS,
    SYNTHETIC_DEFAULTS,
    TrainConfig,
    setting,
)
from yoloscale.config.forms import GRAD_CKPT_NAMES, frozen_prefixes, parse_device, parse_selection
from yoloscale.config.load import load_config
from yoloscale.config.parse import (
    coerce,
    command_help,
    field_help,
    fields_of,
    parse_command,
    parse_override,
    split_override,
    suggest,
)
from yoloscale.config.ultralytics import FRACTION_KEYS, NOT_FOR_TRAINING, ULTRALYTICS_FORMS, ULTRALYTICS_SPELLINGS

__all__ = [
    "FIELDS",
    "FRACTION_AUTO",
    "FRACTION_KEYS",
    "FRACTION_ULTRALYTICS",
    "GRAD_CKPT_NAMES",
    "NOT_FOR_TRAINING",
    "OPTIMIZERS",
    "SYNTHETIC_DEFAULTS",
    "ULTRALYTICS_FORMS",
    "ULTRALYTICS_SPELLINGS",
    "TrainConfig",
    "coerce",
    "command_help",
    "field_help",
    "fields_of",
    "frozen_prefixes",
    "load_config",
    "parse_command",
    "parse_device",
    "parse_override",
    "parse_selection",
    "setting",
    "split_override",
    "suggest",
]
