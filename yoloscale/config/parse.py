"""One `key=value` convention for every command: a value checked (and gently converted) against its field's type and
choices; an unknown key refused with the closest one; a command's own keys beside the training keys; its --help."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import textwrap
import typing
from typing import Any

import yaml

from yoloscale.config.fields import FIELDS, TrainConfig
from yoloscale.config.forms import batch_value
from yoloscale.config.ultralytics import CLOSE_SPELLINGS, NOT_FOR_TRAINING, ULTRALYTICS_FORMS, ULTRALYTICS_SPELLINGS
from yoloscale.errors import UserError

# text keys that also take a boolean: what True/False mean for them (cache=True is Ultralytics' RAM cache)
BOOLISH = {
    "grad_ckpt": {True: "all", False: "off"},
    "cudnn_benchmark": {True: "on", False: "off"},
    "cache": {True: "ram", False: ""},
    "compile": {True: "default", False: "off"},
    "resume": {True: "auto", False: ""},  # Ultralytics' resume=True: the latest run
    "pretrained": {True: "True", False: "False"},
}


@functools.cache
def fields_of(cls: type) -> tuple[dict, dict]:
    return {f.name: f for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)


def field_help(cls: type = TrainConfig) -> list[tuple[str, str, str]]:
    """(name, default, doc) for every field, in declaration order: the body of a command's `--help`."""
    rows = []
    for f in dataclasses.fields(cls):
        choices = f.metadata["choices"]
        doc = f.metadata["doc"] + (f" Choices: {', '.join(repr(c) for c in choices)}." if choices else "")
        rows.append((f.name, repr(f.default), doc))
    return rows


def not_a_key(key: str, keys: dict, command: str = "train") -> str:
    """Why `key` is refused: an Ultralytics key we spell otherwise, or do not use in training, or
    an unknown key (with the closest one, if it is close)."""
    if set(keys) == set(FIELDS):  # the training configuration's keys (not another command's own)
        if key == "task":
            return "Ultralytics' key 'task': yoloscale trains detectors (task=detect)."
        if key in ULTRALYTICS_SPELLINGS:
            return f"Ultralytics' key '{key}' is {ULTRALYTICS_SPELLINGS[key]} here."
        if key in NOT_FOR_TRAINING:
            return f"Ultralytics' key '{key}' is one of {NOT_FOR_TRAINING[key]}: training does not use it."
    return f"unknown key '{key}'.{suggest(key, keys, command)}"


def suggest(key: str, keys=FIELDS, command: str = "train") -> str:
    if set(keys) == set(FIELDS) and key in CLOSE_SPELLINGS:
        return f" Did you mean '{CLOSE_SPELLINGS[key]}'?"
    close = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.75)
    return f" Did you mean '{close[0]}'?" if close else f" Run 'yoloscale {command} --help' for the list of keys."


def coerce(key: str, value: Any, where: str, cls: type = TrainConfig, command: str = "train") -> Any:
    """Check (and gently convert) one value against its field's type and choices."""
    fields, types = fields_of(cls)
    if key not in fields:
        raise UserError(f"{where}: {not_a_key(key, fields, command)}")
    typ = types[key]
    if value is None:  # YAML's null (Ultralytics' args.yaml: time, device, ...): unset, the default
        return fields[key].default
    if key == "batch":
        return batch_value(value, where)
    if key == "device" and isinstance(value, (list, tuple)):  # Ultralytics' device: [0, 1]
        value = ",".join(map(str, value))
    if key == "freeze" and isinstance(value, (list, tuple)):  # a list, even of one: [10] is layer 10, 10 the first 10
        value = f"[{','.join(map(str, value))}]"
    if key in BOOLISH and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if key in BOOLISH and isinstance(value, bool):  # YAML reads off/on/true/false as booleans
        value = BOOLISH[key][value]
    if typ is float and isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
    }[typ]
    if not ok(value):
        raise UserError(f"{where}: key '{key}' expects {typ.__name__}, got {value!r}.")
    value = typ(value)
    choices = fields[key].metadata["choices"]
    if key == "optimizer":  # case-insensitive, as in Ultralytics (sgd, adamw, ...)
        value = {c.lower(): c for c in choices}.get(str(value).lower(), value)
    if choices and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.3)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{where}: key '{key}' must be one of {list(choices)}, got {value!r}.{hint}")
    return value


def split_override(arg: str) -> tuple[str, str]:
    """'key=value' -> (key, the value's text)."""
    if "=" not in arg:
        raise UserError(f"argument '{arg}' is not key=value (and not a YAML file).{suggest(arg)}")
    key, raw = arg.split("=", 1)
    return key.strip(), raw


def parse_override(arg: str, cls: type = TrainConfig) -> tuple[str, Any]:
    """'key=value' -> (key, value): the text itself for a text key (so `time=24:00:00` or `name=0123` stay as
    written), else YAML-parsed, so numbers, booleans and lists get their natural types."""
    key, raw = split_override(arg)
    if fields_of(cls)[1].get(key) is str:
        return key, raw
    try:
        return key, yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return key, raw


def parse_command(
    cls: type, args: list[str], command: str, train_keys: bool = True
) -> tuple[Any, str | None, list[str]]:
    """`[config.yaml] key=value ...` for a command whose own keys are the fields of the dataclass `cls`: (its
    settings, the config file, the key=value of the training configuration, which `load_config` checks). One
    convention for every command; an unknown key names the command's keys and the closest one."""
    cfg_file = args[0] if args and "=" not in args[0] and train_keys else None
    if cfg_file and not cfg_file.endswith((".yaml", ".yml")):
        raise UserError(f"'{cfg_file}' is neither a YAML config file nor key=value.")
    own_fields, _ = fields_of(cls)
    own, train = {}, []
    for arg in args[1:] if cfg_file else args:
        key, value = parse_override(arg, cls if split_override(arg)[0] in own_fields else TrainConfig)
        if key in own_fields:
            own[key] = coerce(key, value, "command line", cls, command)
        elif train_keys and (key in FIELDS or key in ULTRALYTICS_FORMS):
            train.append(arg)
        else:
            keys = [*own_fields, *(FIELDS if train_keys else ())]
            raise UserError(f"command line: unknown key '{key}' for yoloscale {command}.{suggest(key, keys, command)}")
    return cls(**own), cfg_file, train


def command_help(cls: type, command: str, train_keys: bool) -> str:
    """The epilog of a command's --help: its own keys, and where the training keys are listed."""
    lines = [f"keys of yoloscale {command} (key=value):", ""]
    for name, default, doc in field_help(cls):
        lines.append(f"  {name} (default {default})")
        lines.extend(textwrap.wrap(doc, 100, initial_indent="      ", subsequent_indent="      "))
    if train_keys:
        lines += ["", "and every training key (yoloscale train --help lists them), optionally after a config.yaml"]
    return "\n".join(lines)
