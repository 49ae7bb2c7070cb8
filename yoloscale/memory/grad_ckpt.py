"""BN-safe gradient checkpointing of Ultralytics layers (`grad_ckpt=`).

YOLO's memory is mostly activations, so recomputing a layer's forward in the backward pass instead of keeping its
activations is what lets large images and batches fit (docs/backends.md has the numbers). The unit is one layer
of `model.model` (a Conv, C3k2, SPPF, C2PSA, Detect, ...): the same unit FSDP2 shards.

Two things make a plain `torch.utils.checkpoint` wrong for YOLO:
- the recomputation runs every BatchNorm a second time in training mode, which updates its running statistics
  twice per step (pytorch#96136). During the recomputation the layer's BatchNorms run with momentum 0, which
  leaves the running statistics exactly as they are, and `num_batches_tracked` is set back: they are updated
  exactly once per step. (Switching `track_running_stats` off instead changes which tensors batch_norm saves for
  backward, and torch's checkpoint then refuses the recomputation.)
- random ops must replay the same numbers: torch's checkpoint restores the CPU and CUDA RNG states (the default).

What is recomputed (`grad_ckpt_recompute=`): `all` keeps only each checkpointed layer's input and recomputes its whole
forward. `cheap` keeps the outputs of the compute-bound ops (convolutions, matmuls, attention) through torch's
selective checkpointing and recomputes only the memory-bound ones (BatchNorm, SiLU, concatenations, upsampling,
pooling, adds). A Conv block saves three tensors for backward (conv output, BatchNorm output, SiLU output); `cheap`
keeps one. On the CPU (yolo11x, 640 px, batch 2, fp32; benchmarks/grad_ckpt_memory.py, docs/backends.md) the peak grew
by 3.23 GiB without checkpointing, 1.39 GiB with `all` and 1.80 GiB with `cheap`, at 1.41x and 1.13x the step time.
On a GPU `cheap` lost on both counts (-46% peak at 2.2x, one H200): there half the step is the BatchNorm/SiLU work
it still recomputes, and its per-op policy costs host time. `grad_ckpt=highres` is the GPU setting that pays.

We patch the layer instance's `forward` instead of wrapping the module, so parameter names, Ultralytics' layer
attributes (`f`, `i`) and checkpoints are unchanged. Only training-mode forwards with autograd on are checkpointed:
validation runs the plain forward.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from yoloscale.compat import batchnorm_base
from yoloscale.config import parse_selection
from yoloscale.errors import UserError
from yoloscale.speed.compile import is_compiled

HIGHRES_STRIDE = 16  # `highres`: the layers whose output is at this stride or finer, where the activations are
RECOMPUTE = ("all", "cheap")
# The ops whose outputs `cheap` keeps: where the FLOPs are. (Names that a torch build lacks are skipped.)
_KEPT_OPS = {
    getattr(torch.ops.aten, name).default
    for name in (
        "convolution",
        "mm",
        "bmm",
        "addmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(torch.ops.aten, name)
}


def select_layers(model: nn.Module, text: str) -> list[int]:
    """Indices into `model.model` chosen by `text` for this model (backbone/head split from its YAML)."""
    selection, n = parse_selection(text), len(model.model)
    if selection == "off":
        return []
    if selection == "all":
        return list(range(n))
    if selection == "highres":
        layers = high_resolution_layers(model)
        if not layers:  # not a detector: no layer returns one feature map (a 4-D tensor) at stride 16 or finer
            raise UserError(
                f"key 'grad_ckpt': 'highres' found no layer whose output is a feature map at stride <= "
                f"{HIGHRES_STRIDE} in this model; name the layers instead (e.g. grad_ckpt=0-{n - 1})."
            )
        return layers
    if selection == "auto":
        raise ValueError(
            "grad_ckpt=auto is resolved to layer indices before the model is checkpointed (memory/planner.py)"
        )
    if selection in ("backbone", "head"):
        n_backbone = len(model.yaml["backbone"])
        return list(range(n_backbone)) if selection == "backbone" else list(range(n_backbone, n))
    bad = [i for i in selection if i >= n]
    if bad:
        raise UserError(f"key 'grad_ckpt': layer(s) {bad} do not exist; this model has layers 0-{n - 1}.")
    return selection


def high_resolution_layers(model: nn.Module, max_stride: int = HIGHRES_STRIDE) -> list[int]:
    """Layers whose output is one feature map at stride <= max_stride, from one eval-mode forward of a 256 px image
    (the size Ultralytics builds its strides from). On yolo11x that is 0-6 and 11-19: at 640 px, batch 32 and fp16 on
    one H100, checkpointing them cut the peak by 63% at 1.31x the step time; every layer saved 62-64% at 1.39-1.77x
    on an H200 (docs/backends.md). The low-resolution layers hold little activation memory per unit of recomputation."""
    size, strides = 256, {}
    hooks = [
        layer.register_forward_hook(functools.partial(_record_stride, strides, i, size))
        for i, layer in enumerate(model.model)
    ]
    p = next(model.parameters())
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, model.yaml.get("channels", 3), size, size, device=p.device, dtype=p.dtype))
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return [i for i, stride in sorted(strides.items()) if stride <= max_stride]


def _record_stride(strides: dict, i: int, size: int, module, args, output) -> None:
    if isinstance(output, torch.Tensor) and output.dim() == 4:  # Detect and other multi-output heads: not counted
        strides[i] = size // output.shape[-1]


def apply_grad_ckpt(model: nn.Module, text: str, recompute: str = "all") -> list[int]:
    """Checkpoint the selected layers of an Ultralytics model in place; returns their indices."""
    if recompute not in RECOMPUTE:
        raise UserError(f"key 'grad_ckpt_recompute' must be one of {list(RECOMPUTE)}, got {recompute!r}.")
    chosen = select_layers(model, text)
    for i in chosen:
        layer = model.model[i]
        if not _checkpointed(layer):  # layer.forward may be the compiled one (compile.py): it is what is recomputed
            layer.forward = functools.partial(_checkpointed_forward, layer, layer.forward, recompute)
    return chosen


def remove_grad_ckpt(model: nn.Module) -> None:
    """Undo `apply_grad_ckpt` (e.g. before pickling a model for Ultralytics); a compiled forward stays."""
    for layer in model.modules():
        if _checkpointed(layer):
            inner = vars(layer)["forward"].args[1]
            if isinstance(inner, functools.partial):
                layer.forward = inner
            else:
                del layer.forward


def _checkpointed(layer: nn.Module) -> bool:
    patched = vars(layer).get("forward")
    return isinstance(patched, functools.partial) and patched.func is _checkpointed_forward


def _checkpointed_forward(layer: nn.Module, forward, recompute: str, *args):
    if not (layer.training and torch.is_grad_enabled()):
        return forward(*args)
    # A compiled layer must recompute with the very graph of its forward (torch's checkpoint compares what both
    # saved); a changed momentum would select another graph, so its statistics are put back after instead.
    keep_stats = _running_stats_restored if is_compiled(forward) else _running_stats_frozen
    contexts = functools.partial(_contexts, layer, recompute, keep_stats)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts)


def _contexts(layer: nn.Module, recompute: str, keep_stats):
    """(context of the original forward, context of the recomputation)."""
    if recompute == "all":
        return contextlib.nullcontext(), keep_stats(layer)
    forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(_keep_compute_bound)
    return forward_ctx, _entered(keep_stats(layer), recompute_ctx)


def _keep_compute_bound(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _entered(*contexts):
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


def _tracked_norms(layer: nn.Module) -> list[nn.Module]:

    return [m for m in layer.modules() if isinstance(m, batchnorm_base()) and m.track_running_stats]


@contextlib.contextmanager
def _running_stats_restored(layer: nn.Module):
    """A compiled layer's recomputation: the BatchNorm statistics (and `num_batches_tracked`) as they were before it,
    copied back after it."""
    buffers = [b for m in _tracked_norms(layer) for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
    buffers = [b for b in buffers if b is not None]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        if buffers:
            with torch.no_grad():
                torch._foreach_copy_(buffers, saved)


@contextlib.contextmanager
def _running_stats_frozen(layer: nn.Module):
    """BatchNorm momentum 0 during the recomputation: new = 1 x old + 0 x batch, exactly the old statistics, while
    the op itself (and the tensors it saves for backward) stays the same as in the original forward.
    `num_batches_tracked`, counted again by the recomputation, is set back."""
    norms = _tracked_norms(layer)
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.sub_(1)
