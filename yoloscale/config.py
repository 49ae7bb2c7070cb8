"""The single source of truth for a run's settings.

A run is described by one flat, typed `TrainConfig`. Values come from the field defaults, then an optional YAML
file, then `key=value` overrides from the command line (the Ultralytics habit). Every field carries a one-line doc
that `yoloscale train --help` prints. Unknown keys and bad values raise `UserError` naming the key (and the file)
and suggesting the closest valid key.

Keys that Ultralytics' trainer also has mean what they mean there, with its defaults (`batch` is the global batch,
`save_period` counts epochs, `optimizer=auto`, ...); what is ours has its own name (`device_batch`, `save_steps`,
`backend`, ...). The one exception is the embedded quick start: with `data=synthetic` (the default) and no `imgsz` or
`epochs` given, a small run at 160 px for 10 epochs, which trains on a 2-core CPU in a few minutes.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from yoloscale.errors import UserError


def setting(default: Any, doc: str, choices: tuple | None = None) -> Any:
    """A dataclass field with its help text (and allowed values) stored in the metadata."""
    return field(default=default, metadata={"doc": doc, "choices": choices})


OPTIMIZERS = ("auto", "SGD", "MuSGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSprop")
SYNTHETIC_DEFAULTS = {"imgsz": 160, "epochs": 10}  # the embedded quick start: trains on a 2-core CPU in minutes


@dataclass
class TrainConfig:
    # --- what to train on
    model: str = setting(
        "yolo11n.yaml",
        "What to train: a detection model YAML (yolov8/yolo11/yolo12/yolo26, n..x, -p6, or a path), or a local Ultralytics .pt (its architecture and weights: fine-tuning, as in Ultralytics).",
    )
    data: str = setting(
        "synthetic", "Ultralytics data.yaml, or 'synthetic' for the built-in shapes set (generated on first use)."
    )
    weights: str = setting(
        "",
        "Initial weights for a model YAML: a local Ultralytics .pt (trusted sources only: it is a pickle) or our .safetensors; tensors are matched by name and shape.",
    )
    freeze: str = setting(
        "",
        "Ultralytics' key: freeze the first N layers (freeze=10), or the layers or modules listed (freeze=[0,1,23.cv2]); their parameters keep their initial weights. The DFL layer is always frozen.",
    )
    pretrained: str = setting(
        "True",
        "Ultralytics' key: True uses the weights of model=*.pt; False trains its architecture from scratch; a path "
        "(.pt or .safetensors) takes the initial weights from that file, as weights= does.",
    )
    cls_remap: bool = setting(
        True,
        "Fine-tuning from weights of other classes (Ultralytics' key): copy the classification rows of the classes both name alike, instead of starting every class anew.",
    )
    trust_pickle: bool = setting(
        False,
        "Allow a .pt (model= or weights=) that a weights-only load refuses to be read as a full pickle, which can run code: only for files from a trusted source.",
    )
    imgsz: int = setting(
        640, "Train/val image size in pixels (Ultralytics' 640); with data=synthetic and no imgsz given, 160."
    )
    # --- run directory and resume
    project: str = setting("runs", "Folder that holds run directories.")
    name: str = setting(
        "",
        "Run directory name under project (empty: train). Taken by another run, the next free of name2, name3, ... "
        "is used, as in Ultralytics.",
    )
    exist_ok: bool = setting(
        False,
        "Train into project/name itself instead of the next free name (Ultralytics' key); a folder that holds "
        "results is still never overwritten: continue it with resume=.",
    )
    resume: str = setting(
        "",
        "'' for a fresh run; 'auto' (or True, or a bare `resume`, as in Ultralytics) for the latest complete checkpoint of project/name (without name: of the project's latest run); or a run directory, a checkpoint folder, or a run's weights/last.pt.",
    )
    # --- schedule (Ultralytics' meanings and defaults)
    epochs: int = setting(
        100, "Number of training epochs (Ultralytics' 100); with data=synthetic and no epochs given, 10."
    )
    time: float = setting(
        0.0,
        "Hours to train (Ultralytics' key): overrides epochs, which are re-estimated after every epoch from its mean "
        "time; the run stops once the time is spent (counted over resumes). 0 = train for epochs.",
    )
    patience: int = setting(
        100,
        "Stop after this many epochs without a better validation fitness (Ultralytics' early stopping); 0 disables.",
    )
    batch: float = setting(
        16,
        "Global batch: images per micro-step over all devices, split evenly between them (Ultralytics' meaning); or "
        "the largest per-device batch that fits: auto (85% of the GPU's free memory), a fraction like 0.7, or -1 "
        "(Ultralytics' AutoBatch, 60%). Measured on each device by a few short steps (yoloscale plan shows the model).",
    )
    device_batch: int = setting(
        0,
        "Images per device per micro-step; 0 = batch / devices. When set it wins: the global batch is device_batch x devices.",
    )
    accumulate: int = setting(
        0,
        "Micro-steps per optimizer step; 0 = Ultralytics' rule max(round(nbs / batch), 1), ramped up from 1 during warmup.",
    )
    nbs: int = setting(64, "Nominal batch size: weight_decay is scaled by batch x accumulate / nbs (Ultralytics).")
    optimizer: str = setting(
        "auto",
        "Optimizer, Ultralytics' choices: auto picks AdamW (lr0 = 0.002 x 5 / (4 + nc), momentum 0.9) for runs of at most 10,000 iterations, else MuSGD (lr0 0.01, momentum 0.9), and sets warmup_bias_lr=0; or SGD (Nesterov), MuSGD, Adam, Adamax, AdamW, NAdam, RAdam, RMSprop with lr0/momentum as given.",
        OPTIMIZERS,
    )
    lr0: float = setting(0.01, "Initial learning rate (ignored under optimizer=auto, which chooses it).")
    lrf: float = setting(0.01, "Final learning rate as a fraction of lr0.")
    cos_lr: bool = setting(False, "Cosine instead of linear learning-rate decay.")
    momentum: float = setting(0.937, "SGD momentum / Adam beta1 (ignored under optimizer=auto).")
    weight_decay: float = setting(
        0.0005,
        "Weight decay on conv/linear weights (never on BatchNorm or biases), scaled by batch x accumulate / nbs.",
    )
    warmup_epochs: float = setting(
        3.0, "Warmup length in epochs (linear lr ramp, falling bias lr, rising momentum and accumulate)."
    )
    warmup_momentum: float = setting(0.8, "Momentum at the start of warmup.")
    warmup_bias_lr: float = setting(0.1, "Bias learning rate at the start of warmup (optimizer=auto sets 0).")
    grad_clip: float = setting(10.0, "Max gradient norm (Ultralytics uses 10.0); 0 disables clipping.")
    max_bad_steps: int = setting(
        10, "Stop the run after this many consecutive steps with a non-finite loss or gradient norm."
    )
    ema: bool = setting(
        True, "Keep an exponential moving average of the weights (Ultralytics' ModelEMA); validation/export use it."
    )
    ema_decay: float = setting(0.9999, "EMA maximum decay.")
    ema_tau: float = setting(2000.0, "EMA decay ramp time constant, in optimizer steps.")
    # --- precision and devices
    precision: str = setting(
        "auto",
        "Mixed precision: auto (fp16 with dynamic loss scaling on a CUDA GPU, Ultralytics' AMP; bf16 where fp16 is not supported; fp32 on the CPU), fp16, bf16 or fp32.",
        ("auto", "bf16", "fp16", "fp32"),
    )
    device: str = setting(
        "",
        "Ultralytics' device: empty (every GPU the launcher gives, else the CPU), cpu, a GPU index (1), several "
        "(0,1,2,3: one command starts one training process per GPU, as Ultralytics does), or -1 (-1,-1) for the "
        "idlest GPU(s). Indices count the GPUs CUDA_VISIBLE_DEVICES leaves.",
    )
    cpu: bool = setting(False, "Train on the CPU even when a GPU is present (the same as device=cpu).")
    dist_timeout: int = setting(
        600,
        "Seconds a collective may wait for the other processes before the job stops with an error (torch's "
        "default is 1800); raise it only if one step, checkpoint or validation really takes longer.",
    )
    heartbeat_s: float = setting(
        120.0,
        "A process of a multi-process job that shows no sign of life for this many seconds (frozen, stopped, its "
        "node lost) ends the job with a line naming its rank; 0 turns the heartbeat off.",
    )
    sync_bn: bool = setting(False, "Convert BatchNorm to SyncBatchNorm under multi-GPU (CUDA) training.")
    cudnn_benchmark: str = setting(
        "auto",
        "cuDNN autotuning of the training convolutions: on, off, or auto (on once the run has at least 10 minutes of training left, timed over its first micro-steps: autotuning costs tens of seconds and gains a few percent). Validation never autotunes.",
        ("auto", "on", "off"),
    )
    channels_last: bool = setting(True, "Feed the input batch as channels_last on CUDA (parameters stay contiguous).")
    compile: str = setting(
        "off",
        "torch.compile the training model (Ultralytics' key): off, True (= default), or a torch.compile mode. The first steps compile (minutes with inductor on a GPU; torch's caches make a second run of the same model faster); validation runs uncompiled. Measured results: docs/benchmarks.md.",
        ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )
    compile_scope: str = setting(
        "layers",
        "What compile= compiles: layers (each layer of the model on its own; works with grad_ckpt and every backend) or model (the whole model at once, as Ultralytics does; backend=ddp and grad_ckpt=off only).",
        ("layers", "model"),
    )
    compile_backend: str = setting(
        "inductor",
        "torch.compile's backend: inductor (generates kernels), or e.g. aot_eager (Dynamo's graph capture and AOTAutograd without code generation: checks that a model compiles, in seconds).",
    )
    seed: int = setting(0, "Random seed (model init, data order).")
    deterministic: bool = setting(
        True,
        "Deterministic algorithms where torch has them (Ultralytics' key and default: it warns where an op has "
        "none; cuDNN and cuBLAS in their reproducible modes, which may be slower).",
    )
    # --- distributed backend and memory (docs/backends.md says which to pick)
    backend: str = setting(
        "ddp",
        "Data-parallel backend: ddp (the fastest for every YOLO that fits), fsdp (FSDP2, parameters/gradients/optimizer sharded), zero1, zero2 or zero3 (DeepSpeed). Sharding pays only when weights or optimizer state do not fit; YOLO's memory is activations (grad_ckpt). docs/backends.md.",
        ("ddp", "fsdp", "zero1", "zero2", "zero3"),
    )
    offload: str = setting(
        "none",
        "Offload to CPU memory: none, optimizer (zero1/2/3) or params (fsdp, zero3; implies the optimizer too).",
        ("none", "optimizer", "params"),
    )
    grad_ckpt: str = setting(
        "off",
        "Gradient checkpointing of model layers (BN-safe): off, all, backbone, head, highres (the layers at stride <= 16, where the activations are: about 60% less peak memory at about 1.3x the step time), layer indices like '2-8,10', or auto (from the memory model: the fastest choice that fits the batch; with batch=auto see plan_for).",
    )
    plan_for: str = setting(
        "speed",
        "batch=auto with grad_ckpt=auto: speed (the checkpointed layers and batch predicted to train fastest) or batch (the largest batch that fits, checkpointing as many layers as that takes).",
        ("speed", "batch"),
    )
    grad_ckpt_recompute: str = setting(
        "all",
        "With grad_ckpt: 'all' recomputes a checkpointed layer's whole forward (least memory); 'cheap' keeps convolution/matmul outputs and recomputes only BatchNorm, activations and concatenations (less recompute on the CPU; on a GPU slower than 'all' and saving less: docs/backends.md).",
        ("all", "cheap"),
    )
    reshard_after_forward: bool = setting(
        True,
        "fsdp: free gathered parameters after each layer's forward (less memory, one more all-gather in backward).",
    )
    ds_config: str = setting(
        "",
        "zero1/2/3: a DeepSpeed JSON to start from instead of ds_configs/zero<N>.json; fields we own must agree.",
    )
    # --- data loading
    workers: int = setting(
        8,
        "Data loader worker processes per device (Ultralytics' 8), at most the CPU count; validation uses twice as many. Training on the CPU loads in the training process (0 workers), as Ultralytics does: there the step, not the loading, takes the time, and workers would take its cores.",
    )
    pin_memory: bool = setting(True, "Pinned host memory for faster host-to-GPU copies (ignored on CPU).")
    persistent_workers: bool = setting(True, "Keep loader workers alive between epochs.")
    cache: str = setting(
        "", "Cache decoded images: '' (no), 'ram' or 'disk' (Ultralytics' cache).", ("", "ram", "disk")
    )
    fraction: float = setting(
        1.0, "Train on this fraction of the train split's images (Ultralytics' meaning; 1 = all)."
    )
    rect: bool = setting(
        False,
        "Rectangular training batches (Ultralytics' key): images grouped by aspect ratio, each batch padded to its group's shape, in a fixed order (no shuffling) and without mosaic.",
    )
    single_cls: bool = setting(
        False, "Treat every class as one (Ultralytics' meaning: the model gets one class, 'item')."
    )
    multi_scale: float = setting(
        0.0,
        "Ultralytics' multi-scale training: each batch resized to a random size within imgsz x (1 +/- multi_scale), a multiple of the stride (batch=auto plans for the largest); 0 = off.",
    )
    # --- augmentation (Ultralytics' names and meaning)
    close_mosaic: int = setting(10, "Disable mosaic for the final N epochs.")
    mosaic: float = setting(1.0, "Mosaic probability.")
    mixup: float = setting(0.0, "MixUp probability.")
    cutmix: float = setting(0.0, "CutMix probability.")
    copy_paste: float = setting(0.0, "Copy-paste probability (needs segments).")
    copy_paste_mode: str = setting(
        "flip", "Copy-paste strategy: flip or mixup (Ultralytics' meaning).", ("flip", "mixup")
    )
    hsv_h: float = setting(0.015, "HSV hue augmentation (fraction).")
    hsv_s: float = setting(0.7, "HSV saturation augmentation (fraction).")
    hsv_v: float = setting(0.4, "HSV value augmentation (fraction).")
    degrees: float = setting(0.0, "Rotation (+/- degrees).")
    translate: float = setting(0.1, "Translation (+/- fraction).")
    scale: float = setting(0.5, "Scale gain (+/-).")
    shear: float = setting(0.0, "Shear (+/- degrees).")
    perspective: float = setting(0.0, "Perspective (+/- fraction).")
    flipud: float = setting(0.0, "Vertical flip probability.")
    fliplr: float = setting(0.5, "Horizontal flip probability.")
    bgr: float = setting(0.0, "RGB<->BGR channel swap probability.")
    # --- loss gains (Ultralytics' names)
    box: float = setting(7.5, "Box loss gain.")
    cls: float = setting(0.5, "Classification loss gain.")
    cls_pw: float = setting(
        0.0,
        "Class weights in the classification loss (Ultralytics' key): inverse class frequency of the train labels to this power, mean 1 (0 = off, 1 = full inverse frequency).",
    )
    dfl: float = setting(1.5, "Distribution focal loss gain.")
    # --- knowledge distillation (Ultralytics' keys and loss)
    distill_model: str = setting(
        "",
        "Teacher for knowledge distillation (Ultralytics' key): a local Ultralytics .pt, read as model=*.pt is; the student learns its neck features weighted by its class scores. '' = none.",
    )
    dis: float = setting(6.0, "Distillation loss gain (Ultralytics' key; used with distill_model).")
    # --- validation, checkpoints, logging
    val: bool = setting(
        True,
        "Validate (mAP50, mAP50-95 on the EMA weights) at the end of every epoch; the final epoch always validates.",
    )
    val_batch: int = setting(0, "Validation batch per device; 0 = 2 x batch.")
    save_period: int = setting(
        -1,
        "Keep the epoch-end checkpoint of every N-th epoch and write weights/epochN.pt (Ultralytics' meaning); < 1 disables.",
    )
    keep_checkpoints: int = setting(
        2,
        "How many of the newest complete checkpoints to keep; resume falls back to an older one when the newest is damaged.",
    )
    save_steps: int = setting(0, "Also save a resumable checkpoint every N optimizer steps (0: only at epoch ends).")
    log_interval: int = setting(
        10, "Optimizer steps between progress/metric updates (after warmup, the loop's only host syncs of its own)."
    )
    plots: bool = setting(True, "Write results.png (training curves) at the end.")
    wandb: str = setting(
        "off", "Weights & Biases logging: off, offline (no key needed) or online.", ("off", "offline", "online")
    )
    wandb_project: str = setting("yoloscale", "Weights & Biases project name.")

    # ------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Ultralytics' keys that are spelled differently here: named in the "unknown key" message (not accepted as aliases).
ULTRALYTICS_SPELLINGS: dict[str, str] = {}
# Ultralytics' amp= is our precision=: True (auto: fp16 on a GPU), False (fp32), or the precision itself
AMP = {True: "", False: "fp32", "fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
ULTRALYTICS_FORMS = {"amp": "Ultralytics' AMP switch: True (precision=auto), False (fp32), or fp16/bf16/fp32."}
# Ultralytics' keys that training a detector does not use (what they are for). An Ultralytics args.yaml holds them
# all: in a config file they are ignored with one note; given on the command line, refused with that reason.
_NOT_TRAINING = {
    "its predict and val settings": (
        "conf iou max_det split save_json source vid_stride stream_buffer visualize augment agnostic_nms classes "
        "retina_masks embed show save_frames save_txt save_conf save_crop show_labels show_conf show_boxes "
        "line_width tracker dnn"
    ),
    "its export settings (yoloscale export RUN format=... takes them)": "format optimize dynamic simplify opset workspace nms quantize",
    "other tasks than detection": "overlap_mask mask_ratio pose kobj rle angle dlog dgrad dlam auto_augment erasing dropout",
    "its own run bookkeeping": "mode cfg verbose save profile save_dir",
}
NOT_FOR_TRAINING = {key: why for why, keys in _NOT_TRAINING.items() for key in keys.split()}
CLOSE_SPELLINGS = {"lr": "lr0", "lr_final": "lrf", "img_size": "imgsz", "epoch": "epochs"}  # hints difflib misses

# text keys that also take a boolean: what True/False mean for them (cache=True is Ultralytics' RAM cache)
_BOOLISH = {
    "grad_ckpt": {True: "all", False: "off"},
    "cudnn_benchmark": {True: "on", False: "off"},
    "cache": {True: "ram", False: ""},
    "compile": {True: "default", False: "off"},
    "resume": {True: "auto", False: ""},  # Ultralytics' resume=True: the latest run
    "pretrained": {True: "True", False: "False"},
}


def _validate_compile(cfg: TrainConfig, checkpointed: bool) -> None:
    """The combinations with compile= that are tested (tests/distributed/test_backends.py, test_compile.py)."""
    if cfg.compile == "off":
        return
    if cfg.compile_scope == "model" and (cfg.backend != "ddp" or checkpointed):
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


def _batch_value(value: Any, where: str) -> int | float:
    """`batch`: a whole number (kept an int), 'auto' (the fraction FRACTION_AUTO), a fraction in (0, 1), or -1."""
    from yoloscale.plan import FRACTION_AUTO

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


def _not_a_key(key: str, keys: dict, command: str = "train") -> str:
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
        raise UserError(f"{where}: {_not_a_key(key, fields, command)}")
    typ = types[key]
    if value is None:  # YAML's null (Ultralytics' args.yaml: time, device, ...): unset, the default
        return fields[key].default
    if key == "batch":
        return _batch_value(value, where)
    if key == "device" and isinstance(value, (list, tuple)):  # Ultralytics' device: [0, 1]
        value = ",".join(map(str, value))
    if key == "freeze" and isinstance(value, (list, tuple)):  # a list, even of one: [10] is layer 10, 10 the first 10
        value = f"[{','.join(map(str, value))}]"
    if key in _BOOLISH and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if key in _BOOLISH and isinstance(value, bool):  # YAML reads off/on/true/false as booleans
        value = _BOOLISH[key][value]
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


# Keys Ultralytics checks to lie in [0, 1] (its cfg.CFG_FRACTION_KEYS; a test keeps this list complete).
FRACTION_KEYS = (
    "lr0",
    "lrf",
    "momentum",
    "weight_decay",
    "warmup_momentum",
    "warmup_bias_lr",
    "hsv_h",
    "hsv_s",
    "hsv_v",
    "translate",
    "perspective",
    "flipud",
    "fliplr",
    "mosaic",
    "mixup",
    "cutmix",
    "copy_paste",
    "bgr",
    "fraction",
    "multi_scale",
    "cls_pw",
)


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
    from yoloscale.grad_ckpt import parse_selection

    parse_selection(cfg.grad_ckpt)  # raises UserError naming the key
    _validate_compile(cfg, parse_selection(cfg.grad_ckpt) != "off")
    from yoloscale import backend

    backend.get(cfg).validate()  # each backend's own rules (offload, sync_bn, compile, ds_config)
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
    from yoloscale.devices import parse_device

    if parse_device(cfg.device) not in ("", "cpu") and cfg.cpu:  # parse_device refuses a malformed device= first
        raise UserError(f"cpu=True and device={cfg.device} disagree; give one of them.")
    if cfg.distill_model and cfg.backend != "ddp":
        raise UserError(
            f"distill_model= trains with backend=ddp (each device holds the whole teacher), got backend={cfg.backend}."
        )
    if cfg.distill_model and cfg.compile != "off":
        raise UserError("distill_model= runs eagerly (Ultralytics turns compile off with it); leave compile off.")
    if cfg.imgsz % 32:
        raise UserError(f"key 'imgsz' must be a multiple of 32 (the model stride), got {cfg.imgsz}.")


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
    import textwrap

    lines = [f"keys of yoloscale {command} (key=value):", ""]
    for name, default, doc in field_help(cls):
        lines.append(f"  {name} (default {default})")
        lines.extend(textwrap.wrap(doc, 100, initial_indent="      ", subsequent_indent="      "))
    if train_keys:
        lines += ["", "and every training key (yoloscale train --help lists them), optionally after a config.yaml"]
    return "\n".join(lines)


# Keys we no longer have -> (the value that trained as now, why it went). A config.yaml of an earlier run holds them:
# with that value it still loads (resume works); with another the run could not train as asked, so it is refused.
RETIRED = {
    "fused_bn_silu": (False, "its fused BatchNorm+SiLU kernel made the training step slower than eager on a GPU"),
}


def _drop_retired(values: dict, where: str) -> dict:
    for key, (same, why) in RETIRED.items():
        if key in values and _coerce_bool(values[key]) != same:
            raise UserError(f"{where}: key '{key}' was removed ({why}).")
    return {k: v for k, v in values.items() if k not in RETIRED}


def _drop_not_for_training(values: dict, where: str) -> dict:
    """A config file's Ultralytics keys that training does not use (an Ultralytics args.yaml has them all): dropped,
    with one note naming them. `task` must be detection; `project: null` / `name: null` mean our defaults."""
    from yoloscale.errors import warn

    if values.get("task", "detect") != "detect":
        raise UserError(f"{where}: task={values['task']!r}; yoloscale trains detectors (task: detect).")
    dropped = [k for k in values if k in NOT_FOR_TRAINING]
    if dropped:
        warn(
            f"{where}: {len(dropped)} of Ultralytics' keys that training does not use are ignored: {', '.join(dropped)}"
        )
    nulls = [k for k in ("project", "name") if k in values and values[k] is None]
    dropped = {*NOT_FOR_TRAINING, "task", *nulls}
    return {k: v for k, v in values.items() if k not in dropped}


def _ultralytics_forms(values: dict, where: str) -> dict:
    """Ultralytics' amp= becomes precision= (the two given together must agree); device=cpu sets cpu=True."""
    values = dict(values)
    if "amp" in values:
        amp = _coerce_bool(values.pop("amp"))
        if amp not in AMP:
            raise UserError(f"{where}: key 'amp' expects True, False, fp16, bf16 or fp32, got {amp!r}.")
        precision = AMP[amp]
        if precision and values.get("precision", "auto") not in ("auto", precision):
            raise UserError(f"{where}: amp={amp} and precision={values['precision']} disagree; give one of them.")
        if precision:
            values["precision"] = precision
    if str(values.get("device", "")).strip().lower() == "cpu":
        values["cpu"] = True
    return values


def _coerce_bool(value: Any) -> Any:
    return {"true": True, "false": False}.get(value.strip().lower(), value) if isinstance(value, str) else value


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
        loaded = _drop_retired(loaded, f"config file '{path}'")
        loaded = _drop_not_for_training(loaded, f"config file '{path}'")
        loaded = _ultralytics_forms(loaded, f"config file '{path}'")
        values.update({k: coerce(k, v, f"config file '{path}'") for k, v in loaded.items()})
    items = dict(overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides))
    if items.get("task", "detect") == "detect":
        items.pop("task", None)  # Ultralytics' task=detect, the only one trained here
    items = _ultralytics_forms(_drop_retired(items, "command line"), "command line")
    values.update({k: coerce(k, v, "command line") for k, v in items.items()})
    if values.get("data", FIELDS["data"].default) == "synthetic":
        values = {**SYNTHETIC_DEFAULTS, **values}
    cfg = TrainConfig(**values)
    _validate(cfg)
    return cfg
