"""Measuring a MemoryModel (model.py) on the device that will train, on a copy of the model, in the run's precision.

What is measured:
  * the allocator's peak (CUDA: `max_memory_allocated`/`reserved`; the CPU: the process's peak resident memory,
    /proc's VmHWM, reset before each step) of training steps (forward, loss, backward, optimizer step) at two small
    per-device batches: without checkpointing, with every layer checkpointed, and with each layer checkpointed alone
    (a layer that saves nothing for backward is skipped). The slopes are the bytes per image; each layer's saving
    is its own measured, as checkpointing a layer frees less than what it saves for backward (its output, which the
    next layer keeps, stays; a head's tensors are alive for the loss anyway);
  * the step's time at batch 1 (the host's floor) and at two batches large enough to keep the GPU busy (a quarter
    and half of the device's memory), without and with every layer checkpointed; small batches are bound by the
    host launching kernels, and a time model fitted there does not hold at the batches a plan chooses;
  * each layer's share of the forward's time (CUDA events on the GPU), at the larger of those batches.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
from torch import nn

from yoloscale.memory.grad_ckpt import apply_grad_ckpt, remove_grad_ckpt
from yoloscale.memory.model import LayerCost, MemoryModel, StepTime

TIME_MEMORY_FRACTION = (0.25, 0.5)  # the timed batches: these fractions of the device's memory, without checkpointing
MAX_TIMED_BATCH = 512


def measure(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    precision: str,
    imgsz: int,
    batches: tuple[int, int] | None = None,
    device_name: str = "",
    channels_last: bool = False,
) -> MemoryModel:
    """Fit a MemoryModel from steps of `model` (a fresh model on `device`) with `optimizer` (its own). `batches`:
    the two per-device batches of the memory slopes (CUDA's allocator is linear from small batches; the CPU's
    resident memory, through glibc's caches, only from larger ones). `channels_last`: the input batch's layout, as
    the trainer feeds it (on a GPU it changes which convolution kernels run: about a third of the step's time)."""

    batches = batches or ((2, 6) if device.type == "cuda" else (4, 16))
    criterion = model.init_criterion()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    model.train()

    held: dict[int, dict] = {}  # the last batch made: a timed batch can be gigabytes, made once, not every step

    def batch_of(n: int) -> dict:
        if n not in held:
            held.clear()
            held[n] = _batch(n, imgsz, device)
            if channels_last:
                held[n]["img"] = held[n]["img"].contiguous(memory_format=torch.channels_last)
        return held[n]

    def step(n: int) -> float:
        batch = batch_of(n)
        _sync(device)
        start = time.perf_counter()
        with autocast():
            preds = model(batch["img"])
        loss, _ = criterion(preds, batch)
        loss.sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)  # as the trainer (one norm over all gradients)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start

    def slope(repeats: int = 2) -> tuple[float, tuple[float, float]]:
        """(bytes per image, (allocated, reserved) at the larger batch)."""
        peaks = []
        for n in batches:
            _reset_peak(device)
            for _ in range(repeats):
                step(n)
            peaks.append(_peak(device))
        return (peaks[1][0] - peaks[0][0]) / (batches[1] - batches[0]), peaks[1]

    def timed(n: int) -> float:
        step(n)  # a new shape: cuDNN's choices, the allocator's blocks
        return min(step(n), step(n))

    estimates = _layer_costs(model, criterion, device, imgsz, autocast)
    step(batches[0])  # warm-up: optimizer state, cuDNN's choices, lazy allocations
    per_image, (a2, r2) = slope()
    # what autograd saves must be resident: a lower bound for a noisy measurement
    per_image = max(per_image, sum(saved for saved, _ in estimates), 1.0)
    intercept = a2 - per_image * batches[1]
    savings = []
    for i, (saved, inputs) in enumerate(estimates):
        if saved <= 0:  # nothing saved for backward (Concat, Upsample): nothing to free
            savings.append(0.0)
            continue
        apply_grad_ckpt(model, str(i))
        savings.append(max(per_image - slope(repeats=1)[0], 0.0))
        remove_grad_ckpt(model)
    apply_grad_ckpt(model, "all")
    per_image_all = min(max(slope()[0], sum(inputs for _, inputs in estimates), 1.0), per_image)
    remove_grad_ckpt(model)

    # step times: without checkpointing, each layer's share of the forward, then with every layer checkpointed
    n_off = _timed_batches(device, intercept, per_image, batches)
    step_off = _step_time(timed, n_off)
    shares = _forward_shares(model, device, batch_of(n_off[-1])["img"], autocast)
    apply_grad_ckpt(model, "all")
    n_all = _timed_batches(device, intercept, per_image_all, batches)
    step_all = _step_time(timed, n_all)
    remove_grad_ckpt(model)
    held.clear()

    params = list(model.parameters())
    state = float(
        sum(
            t.numel() * t.element_size()
            for s in optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t) and t.dim() > 0
        )
    )
    return MemoryModel(
        device=device_name or device.type,
        precision=precision,
        imgsz=imgsz,
        intercept=intercept,
        per_image=per_image,
        per_image_all=per_image_all,
        reserved_ratio=max(r2 / a2, 1.0) if a2 else 1.0,
        weights=float(sum(p.numel() for p in params) * 4),
        trainable=float(sum(p.numel() for p in params if p.requires_grad) * 4),
        optimizer_state=state,
        buffers=float(sum(b.numel() * b.element_size() for b in model.buffers())),
        step_off=step_off,
        step_all=step_all,
        timed=(*n_off, *n_all),
        layers=[
            LayerCost(saved=saved, inputs=inputs, saving=saving, share=share)
            for (saved, inputs), saving, share in zip(estimates, savings, shares)
        ],
    )


def _timed_batches(device: torch.device, intercept: float, per_image: float, batches: tuple[int, int]) -> list[int]:
    """The batches a step is timed at: 1, then a quarter and half of the GPU's memory (the CPU: the memory
    slopes' batches)."""
    if device.type != "cuda":
        return [1, *batches]
    total = torch.cuda.get_device_properties(device).total_memory
    sizes = [int((total * f - max(intercept, 0.0)) / per_image) for f in TIME_MEMORY_FRACTION]
    low, high = (min(max(n, 2), MAX_TIMED_BATCH) for n in sizes)
    return [1, min(low, high - 1) if high > 2 else 1, max(high, 2)]


def _step_time(timed, sizes: list[int]) -> StepTime:
    """max(host, fixed + per_image x n) through the timed steps: the host's floor at batch 1, the line through the
    two larger batches (not below the floor)."""
    one, low, high = sizes
    t_one, t_low, t_high = timed(one), timed(low), timed(high)
    per = max((t_high - t_low) / (high - low), 0.0) if high > low else t_high / high
    return StepTime(host=t_one, fixed=max(t_high - per * high, 0.0), per_image=per)


def _forward_shares(model: nn.Module, device: torch.device, img: torch.Tensor, autocast) -> list[float]:
    """Each layer's share of a training-mode forward's time on `img` (CUDA events on the GPU: the GPU's time,
    not the host's)."""
    layers, marks = list(model.model), {}

    def mark(i: int, end: bool, *_) -> None:
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        else:
            event = time.perf_counter()
        marks.setdefault(i, []).append(event)

    hooks = [m.register_forward_pre_hook(functools.partial(mark, i, False)) for i, m in enumerate(layers)]
    hooks += [m.register_forward_hook(functools.partial(mark, i, True)) for i, m in enumerate(layers)]
    times = [[] for _ in layers]
    try:
        for _ in range(3):
            marks.clear()
            with autocast():
                model(img)
            _sync(device)
            for i in range(len(layers)):
                start, end = marks[i]
                times[i].append(start.elapsed_time(end) if device.type == "cuda" else end - start)
    finally:
        for h in hooks:
            h.remove()
    seconds = [statistics.median(t[1:]) for t in times]  # the first pass: cuDNN's choices for this batch
    total = sum(seconds)
    return [t / total if total > 0 else 1 / len(layers) for t in seconds]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def _layer_costs(model: nn.Module, criterion, device: torch.device, imgsz: int, autocast) -> list[tuple[float, float]]:
    """Per layer and image: (the bytes saved for backward, the inputs' bytes). Each is the difference between batch 2
    and batch 1, so what does not grow with the batch (the weights a convolution saves, the fp16 copies autocast
    makes of them) cancels out."""
    one, two = (
        _layer_pass(model, criterion, device, imgsz, autocast, 1),
        _layer_pass(model, criterion, device, imgsz, autocast, 2),
    )
    return [(max(s2 - s1, 0.0), max(i2 - i1, 0.0)) for (s1, i1), (s2, i2) in zip(one, two)]


def _layer_pass(model: nn.Module, criterion, device: torch.device, imgsz: int, autocast, n: int) -> list[tuple]:
    """One training forward/backward at batch `n`: per layer (saved bytes, input bytes)."""
    layers = list(model.model)
    saved, inputs = [0.0] * len(layers), [0.0] * len(layers)
    current, seen, seen_inputs = [None], set(), set()

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

    def post(i, module, args, output):
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
    return list(zip(saved, inputs))


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []
