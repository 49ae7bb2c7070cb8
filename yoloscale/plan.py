"""Memory planning: a model of a run's peak memory, fitted from a short measurement on the device that will train.

What is measured (`measure`), on a copy of the model on the device, in the run's precision:
  * two training steps (forward, loss, backward, optimizer step) at each of two small per-device batches, after a
    warm-up step, without and with every layer checkpointed, reading the allocator's peak (CUDA: `max_memory_allocated`/`reserved`; the CPU: the process's peak
    resident memory, /proc's VmHWM, reset before each step); and their times;
  * per layer of `model.model`, per image (batch 2 less batch 1): the bytes autograd saves for backward (a
    saved-tensor hook, attributed to the layer that runs), the bytes of the layer's inputs, and its forward time.
What is modelled (`MemoryModel.peak`): peak = fixed + device_batch x per_image, where
  * per_image = the measured slope without checkpointing, less, for each checkpointed layer, what it saves for
    backward beyond its inputs (which a checkpoint keeps), scaled so that checkpointing every layer gives the
    measured slope with every layer checkpointed; scaled by pixels for another imgsz;
  * fixed = what the measurement's intercept holds beyond the model's own tensors, plus the tensors of this backend
    and world size: weights, gradients and optimizer state (whole under DDP; the optimizer state divided by the
    world size under ZeRO-1, also the gradients under ZeRO-2, everything under ZeRO-3/FSDP2; none in GPU memory where
    offloaded), the EMA (sharded like the weights), the plain copy for validation, and under several processes an
    allowance for NCCL's buffers.
The step time is modelled the same way (t = t0 + t1 x batch + the checkpointed layers' forward times).
A fit is cached per (model, classes, device, precision, imgsz, versions) in the user's cache folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from yoloscale.backend import memory_divisors

GPU_FROM_CPU_ALLOWANCE = 0.5 * 2**30  # a CPU plan for a GPU: workspaces and the allocator (an allowance)
NCCL_ALLOWANCE = 0.5 * 2**30  # several processes: NCCL's buffers and DDP's buckets (an allowance, not measured)
FRACTION_AUTO = 0.85  # batch=auto uses this fraction of the device's memory (Ultralytics' -1: 0.60)
FRACTION_ULTRALYTICS = 0.60


@dataclass
class LayerCost:
    saved: float  # bytes autograd saves for backward, per image
    inputs: float  # bytes of the layer's inputs, per image (what a checkpoint of it keeps)
    forward_s: float  # forward time, per image


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
    step_s: tuple[float, float]  # step time = a + b x batch
    layers: list[LayerCost] = field(default_factory=list)
    cpu_measured: bool = False  # measured on the CPU, planned for a GPU (yoloscale plan gpu_memory=): estimates
    cached_from: str = field(
        default="", compare=False
    )  # the cache file it was read from ('' if measured now); not stored

    # --- predictions --------------------------------------------------------------------------------------------
    def activations_per_image(self, selection: list[int], imgsz: int) -> float:
        """Bytes per image of the activations, with `selection` checkpointed, at `imgsz`."""
        # Each checkpointed layer saves what it would keep for backward less its inputs, which the checkpoint keeps;
        # scaled so that checkpointing every layer saves what was measured doing it.
        gain = [max(layer.saved - layer.inputs, 0.0) for layer in self.layers]
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

    def img_s(self, device_batch: int, imgsz: int, selection: list[int], world: int = 1) -> float:
        """Predicted training img/s of all devices (from the measured step times; roughest at large batches)."""
        pixels = (imgsz / self.imgsz) ** 2
        a, b = self.step_s
        recompute = sum(self.layers[i].forward_s for i in selection if i < len(self.layers))
        seconds = a + (b + recompute) * pixels * device_batch
        return world * device_batch / max(seconds, 1e-9)

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
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if k != "cached_from"})

    @classmethod
    def from_json(cls, text: str) -> MemoryModel:
        data = json.loads(text)
        data["layers"] = [LayerCost(**layer) for layer in data["layers"]]
        data["step_s"] = tuple(data["step_s"])
        data.pop("cached_from", None)
        return cls(**data)


def checkpoint_order(model: MemoryModel) -> list[int]:
    """Layers in the order grad_ckpt=auto checkpoints them: the most memory saved per second of recomputation."""
    gain = [(layer.saved - layer.inputs) / max(layer.forward_s, 1e-9) for layer in model.layers]
    return [
        i for i in sorted(range(len(gain)), key=lambda i: -gain[i]) if model.layers[i].saved > model.layers[i].inputs
    ]


def fewest_layers(
    model: MemoryModel, device_batch: int, limit: float, imgsz: int, backend: str, world: int, offload: str
) -> list[int] | None:
    """grad_ckpt=auto for a given batch: the shortest prefix of `checkpoint_order` that fits (None if none does)."""
    order = checkpoint_order(model)
    for n in range(len(order) + 1):
        selection = sorted(order[:n])
        if model.peak(device_batch, imgsz, selection, backend, world, offload) <= limit:
            return selection
    return None


# --- measuring ---------------------------------------------------------------------------------------------------
def _peak_rss() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    return 0.0


def _reset_peak(device: torch.device) -> float:
    """Reset the peak and return the current level."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return float(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError:
        pass
    return _peak_rss()


def _peak(device: torch.device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device)), float(torch.cuda.max_memory_reserved(device))
    rss = _peak_rss()
    return rss, rss


def _batch(n: int, imgsz: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(n * 3, 4, generator=g) * 0.3 + 0.3
    return {
        "img": torch.rand(n, 3, imgsz, imgsz, generator=g).to(device),
        "batch_idx": torch.arange(n).repeat_interleave(3).float().to(device),
        "cls": torch.zeros(n * 3, 1, device=device),
        "bboxes": boxes.to(device),
    }


def measure(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    precision: str,
    imgsz: int,
    batches: tuple[int, int] | None = None,
    device_name: str = "",
) -> MemoryModel:
    """Fit a MemoryModel from steps of `model` (a fresh model on `device`) with `optimizer` (its own). `batches`:
    the two measured per-device batches (CUDA's allocator is linear from small batches; the CPU's resident memory,
    through glibc's caches, only from larger ones)."""
    batches = batches or ((2, 6) if device.type == "cuda" else (4, 16))
    criterion = model.init_criterion()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    model.train()

    def step(n: int) -> float:
        batch = _batch(n, imgsz, device)
        start = time.perf_counter()
        with autocast():
            preds = model(batch["img"])
        loss, _ = criterion(preds, batch)
        loss.sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    def slope() -> tuple[list, list]:
        step(batches[0])  # warm-up: optimizer state, cuDNN's choices, lazy allocations
        peaks, times = [], []
        for n in batches:
            _reset_peak(device)
            times.append(min(step(n), step(n)))
            peaks.append(_peak(device))
        return peaks, times

    layers = _layer_costs(model, criterion, device, imgsz, autocast)
    peaks, times = slope()
    (a1, r1), (a2, r2) = peaks
    # what autograd saves must be resident, what a checkpoint keeps too: lower bounds for a noisy measurement
    per_image = max((a2 - a1) / (batches[1] - batches[0]), sum(c.saved for c in layers), 1.0)
    intercept = a1 - per_image * batches[0]
    from yoloscale.grad_ckpt import apply_grad_ckpt, remove_grad_ckpt

    apply_grad_ckpt(model, "all")  # the same steps with every layer checkpointed
    (c1, _), (c2, _) = slope()[0]
    remove_grad_ckpt(model)
    per_image_all = min(max((c2 - c1) / (batches[1] - batches[0]), sum(c.inputs for c in layers), 1.0), per_image)
    t_per = (times[1] - times[0]) / (batches[1] - batches[0])
    params = list(model.parameters())
    weights = float(sum(p.numel() for p in params) * 4)
    trainable = float(sum(p.numel() for p in params if p.requires_grad) * 4)
    state = float(
        sum(
            t.numel() * t.element_size()
            for s in optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t) and t.dim() > 0
        )
    )
    buffers = float(sum(b.numel() * b.element_size() for b in model.buffers()))
    return MemoryModel(
        device=device_name or device.type,
        precision=precision,
        imgsz=imgsz,
        intercept=intercept,
        per_image=per_image,
        per_image_all=per_image_all,
        reserved_ratio=max(r2 / a2, 1.0) if a2 else 1.0,
        weights=weights,
        trainable=trainable,
        optimizer_state=state,
        buffers=buffers,
        step_s=(max(times[0] - t_per * batches[0], 0.0), max(t_per, 0.0)),
        layers=layers,
    )


def _layer_costs(model: nn.Module, criterion, device: torch.device, imgsz: int, autocast) -> list[LayerCost]:
    """Per layer and image: the bytes saved for backward, the inputs' bytes, the forward time. Each is the difference
    between batch 2 and batch 1, so what does not grow with the batch (the weights a convolution saves, the fp16 copies
    autocast makes of them) cancels out."""
    one, two = (
        _layer_pass(model, criterion, device, imgsz, autocast, 1),
        _layer_pass(model, criterion, device, imgsz, autocast, 2),
    )
    return [
        LayerCost(saved=max(s2 - s1, 0.0), inputs=max(i2 - i1, 0.0), forward_s=max(t2 - t1, t2 / 2))
        for (s1, i1, t1), (s2, i2, t2) in zip(one, two)
    ]


def _layer_pass(model: nn.Module, criterion, device: torch.device, imgsz: int, autocast, n: int) -> list[tuple]:
    """One training forward/backward at batch `n`: per layer (saved bytes, input bytes, forward seconds)."""
    import functools

    layers = list(model.model)
    saved, inputs, times = [0.0] * len(layers), [0.0] * len(layers), [0.0] * len(layers)
    current, seen, seen_inputs, started = [None], set(), set(), [0.0]

    def pack(t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if current[0] is not None and key not in seen:
            seen.add(key)
            saved[current[0]] += t.untyped_storage().nbytes()
        return t

    def pre(i, module, args):
        current[0] = i
        for a in _tensors(args):  # a tensor several layers read (a Concat's, Detect's) is kept once
            if a.untyped_storage().data_ptr() not in seen_inputs:
                seen_inputs.add(a.untyped_storage().data_ptr())
                inputs[i] += a.numel() * a.element_size()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started[0] = time.perf_counter()

    def post(i, module, args, output):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times[i] += time.perf_counter() - started[0]
        current[0] = None

    hooks = [m.register_forward_pre_hook(functools.partial(pre, i)) for i, m in enumerate(layers)]
    hooks += [m.register_forward_hook(functools.partial(post, i)) for i, m in enumerate(layers)]
    try:
        batch = _batch(n, imgsz, device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
            preds = model(batch["img"])
        loss, _ = criterion(preds, batch)
        loss.sum().backward()
        model.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
    return list(zip(saved, inputs, times))


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


# --- the cache -----------------------------------------------------------------------------------------------------
def cache_root() -> Path:
    """The user's cache folder for yoloscale: $YOLOSCALE_CACHE, else $XDG_CACHE_HOME/yoloscale or ~/.cache/yoloscale."""
    return Path(
        os.environ.get("YOLOSCALE_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "yoloscale")
    )


def cache_dir() -> Path:
    return cache_root() / "plan"


def cache_key(model_spec, nc: int, device_name: str, precision: str, imgsz: int, optimizer: str) -> str:
    import ultralytics

    from yoloscale import __version__

    spec = json.dumps(model_spec, sort_keys=True, default=str)
    text = "|".join(
        [
            spec,
            str(nc),
            device_name,
            precision,
            str(imgsz),
            optimizer,
            torch.__version__,
            ultralytics.__version__,
            __version__,
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
    import re

    from yoloscale.errors import UserError

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
    import psutil

    own = psutil.Process().memory_info().rss  # the fit's intercept counts this process's resident memory
    return (psutil.virtual_memory().available / max(local_world, 1) + own) * fraction


def fmt_gib(x: float) -> str:
    return f"{x / 2**30:.1f}" if math.isfinite(x) else "-"
