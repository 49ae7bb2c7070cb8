"""The single source of truth for a run's settings.

A run is described by one flat, typed `TrainConfig`. Values come from the field defaults, then an optional YAML
file, then `key=value` overrides from the command line (the Ultralytics habit). Every field carries a one-line doc
that `yoloscale train --help` prints. Unknown keys and bad values raise `UserError` naming the key (and the file)
and suggesting the closest valid key.

The defaults describe the embedded quick-start run: a small model on the synthetic shapes set at 160 px, which
trains on a 2-core CPU in a few minutes. For real data pass at least `data=`, `model=` and `imgsz=640`.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from yoloscale.errors import UserError


def _f(default: Any, doc: str, choices: tuple | None = None) -> Any:
    """A dataclass field with its help text (and allowed values) stored in the metadata."""
    return field(default=default, metadata={"doc": doc, "choices": choices})


@dataclass
class TrainConfig:
    # --- what to train on
    model: str = _f("yolo11n.yaml", "Ultralytics detection model YAML (yolov8/yolo11/yolo12/yolo26, n..x, -p6) or a path to one.")
    data: str = _f("synthetic", "Ultralytics data.yaml, or 'synthetic' for the built-in shapes set (generated on first use).")
    weights: str = _f("", "Initial weights: a local Ultralytics .pt (trusted sources only: it is a pickle) or our .safetensors.")
    imgsz: int = _f(160, "Train/val image size in pixels (160 suits the synthetic set; use 640 or more for real data).")
    # --- run directory and resume
    project: str = _f("runs", "Folder that holds run directories.")
    name: str = _f("", "Run directory name under project; empty picks train, train2, ... An existing run is never overwritten.")
    resume: str = _f("", "'' for a fresh run, 'auto' for the latest complete checkpoint of project/name, or a checkpoint/run path.")
    # --- schedule
    epochs: int = _f(10, "Number of training epochs.")
    batch: int = _f(16, "Images per device per micro-step (per GPU; global batch = batch x devices x accumulate).")
    accumulate: int = _f(0, "Micro-steps per optimizer step; 0 = Ultralytics' rule max(round(nbs / (batch x devices)), 1).")
    nbs: int = _f(64, "Nominal batch size: lr0 and weight_decay are tuned for this global batch.")
    lr_scaling: str = _f("linear", "How lr follows the global batch: 'linear' (lr = lr0 x global/nbs, Ultralytics' behaviour) or 'none'.", ("linear", "none"))
    optimizer: str = _f("SGD", "Optimizer: SGD (Nesterov) or AdamW.", ("SGD", "AdamW"))
    lr0: float = _f(0.01, "Initial learning rate at the nominal batch size.")
    lrf: float = _f(0.01, "Final learning rate as a fraction of lr0.")
    cos_lr: bool = _f(False, "Cosine instead of linear learning-rate decay.")
    momentum: float = _f(0.937, "SGD momentum / AdamW beta1.")
    weight_decay: float = _f(0.0005, "Weight decay on conv/linear weights (never on BatchNorm or biases).")
    warmup_epochs: float = _f(3.0, "Warmup length in epochs (linear lr ramp, falling bias lr, rising momentum).")
    warmup_momentum: float = _f(0.8, "Momentum at the start of warmup.")
    warmup_bias_lr: float = _f(0.1, "Bias learning rate at the start of warmup.")
    grad_clip: float = _f(10.0, "Max gradient norm (Ultralytics uses 10.0); 0 disables clipping.")
    max_bad_steps: int = _f(10, "Stop the run after this many consecutive steps with a non-finite loss or gradient norm.")
    ema: bool = _f(True, "Keep an exponential moving average of the weights (Ultralytics' ModelEMA); validation/export use it.")
    ema_decay: float = _f(0.9999, "EMA maximum decay.")
    ema_tau: float = _f(2000.0, "EMA decay ramp time constant, in optimizer steps.")
    # --- precision and devices
    precision: str = _f("auto", "Mixed precision: auto (bf16 on a CUDA GPU that supports it, else fp32), bf16, fp16 (dynamic loss scaling) or fp32.", ("auto", "bf16", "fp16", "fp32"))
    cpu: bool = _f(False, "Train on the CPU even when a GPU is present.")
    sync_bn: bool = _f(False, "Convert BatchNorm to SyncBatchNorm under multi-GPU (CUDA) training.")
    channels_last: bool = _f(True, "Feed the input batch as channels_last on CUDA (parameters stay contiguous).")
    compile: bool = _f(False, "torch.compile the training model in place (backend=ddp, grad_ckpt=off). yolo11x on one GPU: 2.8-4.1 min of compilation in the first step, then 1.06-1.12x eager's speed in bf16, none in fp16, 25% less peak memory (docs/benchmarks.md).")
    seed: int = _f(0, "Random seed (model init, data order).")
    # --- distributed backend and memory (docs/backends.md says which to pick)
    backend: str = _f("ddp", "Data-parallel backend: ddp (the fastest for every YOLO that fits), fsdp (FSDP2, parameters/gradients/optimizer sharded), zero1, zero2 or zero3 (DeepSpeed). Sharding pays only when weights or optimizer state do not fit; YOLO's memory is activations (grad_ckpt). docs/backends.md.", ("ddp", "fsdp", "zero1", "zero2", "zero3"))
    offload: str = _f("none", "Offload to CPU memory: none, optimizer (zero1/2/3) or params (fsdp, zero3; implies the optimizer too).", ("none", "optimizer", "params"))
    grad_ckpt: str = _f("off", "Gradient checkpointing of model layers (BN-safe): off, all, backbone, head, highres (the layers at stride <= 16, where the activations are: yolo11x -63% peak at 1.31x step on an H100), or layer indices like '2-8,10'.")
    grad_ckpt_recompute: str = _f("all", "With grad_ckpt: 'all' recomputes a checkpointed layer's whole forward (least memory); 'cheap' keeps convolution/matmul outputs and recomputes only BatchNorm, activations and concatenations (less recompute on the CPU; on a GPU slower than 'all' and saving less: docs/backends.md).", ("all", "cheap"))
    reshard_after_forward: bool = _f(True, "fsdp: free gathered parameters after each layer's forward (less memory, one more all-gather in backward).")
    ds_config: str = _f("", "zero1/2/3: a DeepSpeed JSON to start from instead of ds_configs/zero<N>.json; fields we own must agree.")
    # --- data loading
    workers: int = _f(2, "Data loader worker processes per device.")
    pin_memory: bool = _f(True, "Pinned host memory for faster host-to-GPU copies (ignored on CPU).")
    persistent_workers: bool = _f(True, "Keep loader workers alive between epochs.")
    cache: str = _f("", "Cache decoded images: '' (no), 'ram' or 'disk' (Ultralytics' cache).", ("", "ram", "disk"))
    # --- augmentation (Ultralytics' names and meaning)
    close_mosaic: int = _f(10, "Disable mosaic for the final N epochs.")
    mosaic: float = _f(1.0, "Mosaic probability.")
    mixup: float = _f(0.0, "MixUp probability.")
    cutmix: float = _f(0.0, "CutMix probability.")
    copy_paste: float = _f(0.0, "Copy-paste probability (needs segments).")
    hsv_h: float = _f(0.015, "HSV hue augmentation (fraction).")
    hsv_s: float = _f(0.7, "HSV saturation augmentation (fraction).")
    hsv_v: float = _f(0.4, "HSV value augmentation (fraction).")
    degrees: float = _f(0.0, "Rotation (+/- degrees).")
    translate: float = _f(0.1, "Translation (+/- fraction).")
    scale: float = _f(0.5, "Scale gain (+/-).")
    shear: float = _f(0.0, "Shear (+/- degrees).")
    perspective: float = _f(0.0, "Perspective (+/- fraction).")
    flipud: float = _f(0.0, "Vertical flip probability.")
    fliplr: float = _f(0.5, "Horizontal flip probability.")
    # --- loss gains (Ultralytics' names)
    box: float = _f(7.5, "Box loss gain.")
    cls: float = _f(0.5, "Classification loss gain.")
    dfl: float = _f(1.5, "Distribution focal loss gain.")
    # --- validation, checkpoints, logging
    val: bool = _f(True, "Validate (mAP50, mAP50-95 on the EMA weights) at the end of every epoch; the final epoch always validates.")
    val_batch: int = _f(0, "Validation batch per device; 0 = 2 x batch.")
    save_period: int = _f(0, "Also save a resumable checkpoint every N optimizer steps (0: only at epoch ends).")
    log_interval: int = _f(10, "Optimizer steps between progress/metric updates (after warmup, the loop's only host syncs of its own).")
    plots: bool = _f(True, "Write results.png (training curves) at the end.")
    wandb: str = _f("off", "Weights & Biases logging: off, offline (no key needed) or online.", ("off", "offline", "online"))
    wandb_project: str = _f("yoloscale", "Weights & Biases project name.")

    # ------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def field_help() -> list[tuple[str, str, str]]:
    """(name, default, doc) for every field, in declaration order: the body of `yoloscale train --help`."""
    rows = []
    for f in dataclasses.fields(TrainConfig):
        choices = f.metadata["choices"]
        doc = f.metadata["doc"] + (f" Choices: {', '.join(repr(c) for c in choices)}." if choices else "")
        rows.append((f.name, repr(f.default), doc))
    return rows


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else " Run 'yoloscale train --help' for the list of keys."


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check (and gently convert) one value against its field's type and choices."""
    if key not in FIELDS:
        raise UserError(f"{where}: unknown key '{key}'.{_suggest(key)}")
    typ = _TYPES[key]
    if value is None and typ is str:
        value = ""
    if key == "grad_ckpt" and isinstance(value, bool):  # YAML reads off/on/true/false as booleans
        value = "all" if value else "off"
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
    choices = FIELDS[key].metadata["choices"]
    if choices and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.3)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{where}: key '{key}' must be one of {list(choices)}, got {value!r}.{hint}")
    return value


def _validate(cfg: TrainConfig) -> None:
    positive = ("imgsz", "epochs", "batch", "nbs", "log_interval", "max_bad_steps")
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise UserError(f"key '{key}' must be > 0, got {getattr(cfg, key)}.")
    for key in ("accumulate", "workers", "save_period", "val_batch", "close_mosaic", "grad_clip", "lr0"):
        if getattr(cfg, key) < 0:
            raise UserError(f"key '{key}' must be >= 0, got {getattr(cfg, key)}.")
    from yoloscale.grad_ckpt import parse_selection

    parse_selection(cfg.grad_ckpt)  # raises UserError naming the key
    if cfg.offload == "optimizer" and cfg.backend == "fsdp":
        raise UserError("offload=optimizer is not available with backend=fsdp: FSDP2 offloads parameters, gradients "
                        "and optimizer state together (offload=params), or use backend=zero2 offload=optimizer.")
    if cfg.offload == "params" and cfg.backend == "fsdp" and cfg.precision == "fp16":
        raise UserError("precision=fp16 with backend=fsdp offload=params is not supported: torch's GradScaler "
                        "all-reduces its overflow check where the gradients are, in CPU memory, which NCCL cannot "
                        "(2 x H200, torch 2.11, 2026-11-24). Use precision=bf16 with offload, or fp16 without it.")
    if cfg.offload == "params" and cfg.backend not in ("fsdp", "zero3"):
        raise UserError(f"offload=params needs backend=fsdp or zero3 (only they shard parameters); got backend={cfg.backend}.")
    if cfg.offload != "none" and cfg.backend == "ddp":
        raise UserError("offload needs a sharded backend (fsdp, zero1, zero2, zero3); got backend=ddp.")
    if cfg.ds_config and not cfg.backend.startswith("zero"):
        raise UserError(f"ds_config='{cfg.ds_config}' is a DeepSpeed configuration, but backend={cfg.backend}; use backend=zero1/2/3.")
    if cfg.compile and (cfg.backend != "ddp" or parse_selection(cfg.grad_ckpt) != "off"):
        raise UserError(f"compile=True is supported with backend=ddp and grad_ckpt=off only (got backend={cfg.backend}, "
                        f"grad_ckpt={cfg.grad_ckpt}): the other combinations are not tested.")
    if cfg.imgsz % 32:
        raise UserError(f"key 'imgsz' must be a multiple of 32 (the model stride), got {cfg.imgsz}.")


def parse_override(arg: str) -> tuple[str, Any]:
    """'key=value' -> (key, YAML-parsed value), so numbers, booleans and lists get their natural types."""
    if "=" not in arg:
        raise UserError(f"argument '{arg}' is not key=value (and not a YAML file).{_suggest(arg)}")
    key, raw = arg.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


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
        values.update({k: _coerce(k, v, f"config file '{path}'") for k, v in loaded.items()})
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    values.update({k: _coerce(k, v, "command line") for k, v in items})
    cfg = TrainConfig(**values)
    _validate(cfg)
    return cfg
