"""Memory planning: a model of a run's peak memory and step time, fitted from a short measurement on the device
that will train (memory/measure.py).

What is modelled:
  * `MemoryModel.peak` = fixed + device_batch x per_image, where per_image is the measured slope without
    checkpointing less, for each checkpointed layer, what checkpointing that layer alone was measured to save, scaled
    so that checkpointing every layer gives the slope measured that way; scaled by pixels for another imgsz;
  * fixed = what the measurement's intercept holds beyond the model's own tensors, plus the tensors of this backend
    and world size: weights, gradients and optimizer state (whole under DDP; the optimizer state divided by the
    world size under ZeRO-1, also the gradients under ZeRO-2, everything under ZeRO-3/FSDP2; none in GPU memory where
    offloaded), the EMA (sharded like the weights), the plain copy for validation, and under several processes an
    allowance for NCCL's buffers;
  * `MemoryModel.img_s`: a step takes max(host, fixed + per_image x batch) seconds: the host's floor (launching the
    step's kernels) where the batch is small, the GPU's time where it is large; measured without and with every layer
    checkpointed, a selection in between adds its layers' share of the forward time.
A fit is cached per (model, classes, device, precision, imgsz, versions) in the user's cache folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
import ultralytics

from yoloscale import __version__
from yoloscale.backend import memory_divisors
from yoloscale.cache import cache_root
from yoloscale.errors import UserError

FORMAT = 3  # of a cached fit (a fit of another format is measured again)
GPU_FROM_CPU_ALLOWANCE = 0.5 * 2**30  # a CPU plan for a GPU: workspaces and the allocator (an allowance)
NCCL_ALLOWANCE = 0.5 * 2**30  # several processes: NCCL's buffers and DDP's buckets (an allowance, not measured)


@dataclass
class LayerCost:
    saved: float  # bytes autograd saves for backward, per image (a saved-tensor hook's count)
    inputs: float  # bytes of the layer's inputs, per image (what a checkpoint of it keeps)
    saving: float  # bytes per image that checkpointing this layer alone saved, measured (-1: not measured)
    share: float  # the layer's share of the forward's time: what recomputing it adds, as a share of every layer's

    def weight(self) -> float:
        """What checkpointing this layer saves, per image: measured, else the hook's count less the inputs."""
        return max(self.saving if self.saving >= 0 else self.saved - self.inputs, 0.0)


@dataclass
class StepTime:
    """Seconds of one training step at per-device batch n: max(host, fixed + per_image x n)."""

    host: float  # the floor: the host launching the step (measured at batch 1)
    fixed: float
    per_image: float

    def seconds(self, n: float) -> float:
        return max(self.host, self.fixed + self.per_image * n)


@dataclass
class MemoryModel:
    device: str  # the device measured ("NVIDIA H200", "cpu")
    precision: str
    imgsz: int  # the image size measured
    intercept: float  # bytes at batch 0 of the measurement (DDP, one process)
    per_image: float  # bytes per image of the measurement (no checkpointing)
    per_image_all: float  # ... with every layer checkpointed
    reserved_ratio: float  # the allocator's reserved / allocated at the measured peaks
    weights: float  # fp32 bytes of the parameters
    trainable: float  # fp32 bytes of the trainable parameters
    optimizer_state: float  # bytes of the optimizer's state (whole)
    buffers: float
    step_off: StepTime  # no layer checkpointed
    step_all: StepTime  # every layer checkpointed
    timed: tuple[int, ...] = ()  # the per-device batches the step times were measured at (off, then all)
    layers: list[LayerCost] = field(default_factory=list)
    cpu_measured: bool = False  # measured on the CPU, planned for a GPU (yoloscale plan gpu_memory=): estimates
    cached_from: str = field(
        default="", compare=False
    )  # the cache file it was read from ('' if measured now); not stored

    # --- predictions --------------------------------------------------------------------------------------------
    def activations_per_image(self, selection: list[int], imgsz: int) -> float:
        """Bytes per image of the activations, with `selection` checkpointed, at `imgsz`."""
        # Layers' savings overlap a little (a tensor two neighbours keep is freed once): scaled so that checkpointing
        # every layer saves what was measured doing it (the single-layer savings sum to a little more than that).
        gain = [layer.weight() for layer in self.layers]
        k = (self.per_image - self.per_image_all) / sum(gain) if sum(gain) else 0.0
        per = self.per_image - k * sum(gain[i] for i in selection if i < len(gain))
        return per * (imgsz / self.imgsz) ** 2 * (0.5 if self.cpu_measured and self.precision != "fp32" else 1.0)

    def fixed(self, backend: str, world: int, offload: str = "none") -> float:
        """Bytes that do not grow with the batch, for a backend and world size."""
        own = self.weights + self.trainable + self.optimizer_state + 2 * self.weights + 2 * self.buffers  # + EMA, eval
        # the measurement's intercept beyond the model's own tensors; a GPU planned from the CPU: an allowance for
        # cuDNN's workspaces and the allocator (the CPU's intercept is the process's libraries)
        base = GPU_FROM_CPU_ALLOWANCE if self.cpu_measured else max(self.intercept - own, 0.0)
        w, g, o = self.weights, self.trainable, self.optimizer_state
        shard = memory_divisors(backend, world)
        w, g, o = w / shard[0], g / shard[1], o / shard[2]
        if offload in ("optimizer", "params"):
            o = 0.0
        if offload == "params":
            w = g = 0.0
        ema = self.weights / shard[0] + self.buffers
        total = base + w + g + o + ema + self.weights + self.buffers
        return total + (NCCL_ALLOWANCE if world > 1 else 0.0)

    def peak(
        self,
        device_batch: int,
        imgsz: int,
        selection: list[int],
        backend: str = "ddp",
        world: int = 1,
        offload: str = "none",
    ) -> float:
        """Predicted peak memory (bytes the allocator reserves) on one device."""
        allocated = self.fixed(backend, world, offload) + device_batch * self.activations_per_image(selection, imgsz)
        return allocated * self.reserved_ratio

    def step_seconds(self, device_batch: int, imgsz: int, selection: list[int]) -> float:
        """Predicted seconds of one training step on one device."""
        chosen = [i for i in set(selection) if i < len(self.layers)]
        share = sum(self.layers[i].share for i in chosen)  # of the recomputation of every layer
        count = len(chosen) / max(len(self.layers), 1)  # the host launches each checkpointed layer's kernels again
        off, every = self.step_off, self.step_all
        step = StepTime(
            host=off.host + (every.host - off.host) * count,
            fixed=off.fixed + (every.fixed - off.fixed) * share,
            per_image=off.per_image + (every.per_image - off.per_image) * share,
        )
        return step.seconds(device_batch * (imgsz / self.imgsz) ** 2)

    def img_s(self, device_batch: int, imgsz: int, selection: list[int], world: int = 1) -> float:
        """Predicted training img/s of all devices (a step's images over its predicted seconds)."""
        return world * device_batch / max(self.step_seconds(device_batch, imgsz, selection), 1e-9)

    def largest_batch(
        self,
        limit: float,
        imgsz: int,
        selection: list[int],
        backend: str = "ddp",
        world: int = 1,
        offload: str = "none",
    ) -> int:
        """The largest per-device batch whose predicted peak stays within `limit` bytes (0 if none)."""
        per = self.activations_per_image(selection, imgsz) * self.reserved_ratio
        room = limit - self.fixed(backend, world, offload) * self.reserved_ratio
        return max(int(room // per), 0) if per > 0 else 0

    def to_json(self) -> str:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "cached_from"}
        return json.dumps({"format": FORMAT, **data})

    @classmethod
    def from_json(cls, text: str) -> MemoryModel:
        data = json.loads(text)
        if data.pop("format", None) != FORMAT:
            raise ValueError("a fit of another format")
        data["layers"] = [LayerCost(**layer) for layer in data["layers"]]
        data["step_off"], data["step_all"] = StepTime(**data["step_off"]), StepTime(**data["step_all"])
        data["timed"] = tuple(data["timed"])
        data.pop("cached_from", None)
        return cls(**data)


def checkpoint_order(model: MemoryModel) -> list[int]:
    """Layers in the order grad_ckpt=auto checkpoints them: the most memory saved per second of recomputation."""
    gain = [layer.weight() / max(layer.share, 1e-9) for layer in model.layers]
    return [i for i in sorted(range(len(gain)), key=lambda i: -gain[i]) if model.layers[i].weight() > 0]


def layers_for_batch(
    model: MemoryModel, device_batch: int, limit: float, imgsz: int, backend: str, world: int, offload: str
) -> list[int] | None:
    """grad_ckpt=auto for a given batch: of the prefixes of `checkpoint_order` that fit, the one predicted to step
    fastest (the fewer layers on a tie; None if none fits)."""
    order, best = checkpoint_order(model), None
    for n in range(len(order) + 1):
        selection = sorted(order[:n])
        if model.peak(device_batch, imgsz, selection, backend, world, offload) > limit:
            continue
        seconds = model.step_seconds(device_batch, imgsz, selection)
        if best is None or seconds < best[0]:
            best = (seconds, selection)
    return best[1] if best else None


# --- the cache -----------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return cache_root() / "plan"


def peak_report(real: float, predicted: float, steps: int) -> str:
    """The log's line comparing a run's real peak (bytes the allocator reserved) with the memory model's."""
    gib = 2**30
    if not predicted:
        return (
            f"peak memory {real / gib:.1f} GiB after {steps} steps (no memory model is cached for this model, imgsz "
            "and GPU to compare with: yoloscale plan measures one)"
        )
    return (
        f"peak memory {real / gib:.1f} GiB after {steps} steps; the plan predicted {predicted / gib:.1f} GiB "
        f"(real {real / predicted:.2f}x predicted)"
    )


def cache_key(
    model_spec, nc: int, device_name: str, precision: str, imgsz: int, optimizer: str, channels_last: bool = False
) -> str:

    spec = json.dumps(model_spec, sort_keys=True, default=str)
    text = "|".join(
        [
            spec,
            str(nc),
            device_name,
            precision,
            str(imgsz),
            optimizer,
            f"channels_last={channels_last}",
            torch.__version__,
            ultralytics.__version__,
            __version__,
            str(FORMAT),
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cached(key: str) -> MemoryModel | None:
    path = cache_dir() / f"{key}.json"
    try:
        fit = MemoryModel.from_json(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if fit is not None:
        fit.cached_from = str(path)
    return fit


def store(key: str, fit: MemoryModel) -> None:
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        tmp = cache_dir() / f".tmp-{key}.json"
        tmp.write_text(fit.to_json())
        tmp.replace(cache_dir() / f"{key}.json")
    except OSError:
        pass  # a read-only home: plan again next time


def parse_memory(text: str) -> float:
    """'80GiB', '141GB', '24GiB' -> bytes."""

    m = re.fullmatch(r"\s*([\d.]+)\s*(GiB|GB|MiB|MB|TiB|TB)?\s*", str(text))
    if not m:
        raise UserError(f"key 'gpu_memory' takes a size like 80GiB or 141GB, got {text!r}.")
    unit = {"GiB": 2**30, "GB": 1e9, "MiB": 2**20, "MB": 1e6, "TiB": 2**40, "TB": 1e12, None: 2**30}[m.group(2)]
    return float(m.group(1)) * unit


def device_limit(device: torch.device, fraction: float, local_world: int = 1) -> float:
    """Bytes a run may use on this device: `fraction` of the GPU's free memory at the start (the CUDA context and
    other processes already subtracted), or of the available RAM per local process on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free * fraction

    own = psutil.Process().memory_info().rss  # the fit's intercept counts this process's resident memory
    return (psutil.virtual_memory().available / max(local_world, 1) + own) * fraction


def fmt_gib(x: float) -> str:
    return f"{x / 2**30:.1f}" if math.isfinite(x) else "-"
