"""The run's settings: one flat, typed, frozen `TrainConfig`; every field carries the one-line doc that
`yoloscale train --help` prints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def setting(default: Any, doc: str, choices: tuple | None = None) -> Any:
    """A dataclass field with its help text (and allowed values) stored in the metadata."""
    return field(default=default, metadata={"doc": doc, "choices": choices})


OPTIMIZERS = ("auto", "SGD", "MuSGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSprop")
FRACTION_AUTO = 0.85  # batch=auto uses this fraction of the device's memory (Ultralytics' -1: 0.60)
FRACTION_ULTRALYTICS = 0.60  # batch=-1: Ultralytics' AutoBatch fraction
SYNTHETIC_DEFAULTS = {"imgsz": 160, "epochs": 10}  # the embedded quick start: trains on a 2-core CPU in minutes


@dataclass(frozen=True)
class TrainConfig:
    """A run's settings, checked and frozen once parsed (load_config); what a run derives from them is its plan
    (training/run_plan.py)."""

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
