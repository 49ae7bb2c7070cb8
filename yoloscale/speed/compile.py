"""torch.compile of the training model (`compile=`, `compile_scope=`, `compile_backend=`).

`compile_scope=layers` (the default) compiles each layer of `model.model` (a Conv, C3k2, SPPF, C2PSA, Detect, ...)
on its own; `model` compiles the whole model at once, as Ultralytics' `compile=True` does. Why layers:
- The layer is the unit that `grad_ckpt` checkpoints and that FSDP2 and ZeRO-3 gather and release. A compiled layer
  sits inside those: the checkpoint (eager) runs the compiled forward and runs it again in the backward pass, with
  its BN-safe context around it; the shard hooks run around the compiled forward. Dynamo cannot trace our BN-safe
  recompute context, so a compiled whole model could not be checkpointed.
- What is compiled is the layer's class `forward`, with the layer as an argument: layers of one class and one shape
  (repeated blocks) share one compiled graph, and a compile's cost grows with the number of distinct layers, not the
  depth. Torch's own caches (Inductor's FX graph cache and AOTAutograd's cache, in `TORCHINDUCTOR_CACHE_DIR`, here
  under the user's cache folder so that they outlive /tmp) make the second run of the same model mostly cache hits.
- The batch dimension of every layer input is marked dynamic, so the epoch's final partial batch reuses the graphs
  (torch specialises a batch of exactly 1: such a batch compiles once more, in the first epoch).
Validation runs on the separate, uncompiled eval copy: its rectangular batches never compile. State-dict keys,
the EMA and checkpoints are unchanged by either scope.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from yoloscale import compat
from yoloscale.cache import cache_root

if TYPE_CHECKING:
    from yoloscale.config import TrainConfig


def speed_up(model: nn.Module, cfg: TrainConfig) -> str:
    """What `compile=` asks for, applied to the training model (not the eval copy); returns what was done, for the
    run's log ('' for nothing)."""
    return compile_training_model(model, cfg.compile, cfg.compile_scope, cfg.compile_backend)


def compile_training_model(model: nn.Module, mode: str, scope: str, backend: str = "inductor") -> str:
    """Compile `model` (an Ultralytics DetectionModel) in place; returns a short description for the run's log.
    Compilation itself is lazy: it happens in the first forward/backward."""

    if mode == "off":
        return ""
    use_persistent_cache()
    options = dict(mode=None if mode == "default" else mode, backend=backend)
    if scope == "model":
        model.compile(**options)
        return f"compile: the whole model ({mode}, {backend})"
    compiled: dict[type, object] = {}
    for layer in model.model:
        forward = compiled.setdefault(type(layer), torch.compile(type(layer).forward, **options))
        # An instance attribute, as grad_ckpt patches it: module names, Ultralytics' `f`/`i` and state-dict keys
        # stay; a partial (not a closure) so that a deepcopy of the model calls the copy's own layer.
        layer.forward = functools.partial(_batch_dynamic_forward, forward, layer)
    # One graph per distinct layer (class x shapes) and one more for a batch of 1: torch's default limit of 8 per
    # function would silently send the rest of a class's layers back to eager.
    compat.configure_dynamo_for_layers(2 * len(model.model) + 8)
    return f"compile: {len(model.model)} layers, {len(compiled)} layer classes ({mode}, {backend})"


def is_compiled(forward) -> bool:
    """Whether a layer's forward is one that `compile_training_model` set (grad_ckpt recomputes it differently)."""
    return isinstance(forward, functools.partial) and forward.func is _batch_dynamic_forward


def _batch_dynamic_forward(forward, layer: nn.Module, *args):
    for a in args:
        _mark_batch_dynamic(a)
    return forward(layer, *args)


def _mark_batch_dynamic(value) -> None:
    if isinstance(value, torch.Tensor):
        torch._dynamo.maybe_mark_dynamic(value, 0)  # public: torch._dynamo's documented marking API
    elif isinstance(value, (list, tuple)):  # Detect and Concat take a list of feature maps
        for v in value:
            _mark_batch_dynamic(v)


def use_persistent_cache() -> Path:
    """Inductor's caches under the user's cache folder unless `TORCHINDUCTOR_CACHE_DIR` is set (torch's default is
    /tmp/torchinductor_<user>, which a reboot or a cluster's node-local /tmp loses); Triton's kernel cache already
    lives under the home folder."""

    return Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "torchinductor")))


class CompileWatch:
    """Counts the graphs Dynamo has compiled, so a recompilation after the first epoch is said, not silent (each one
    costs seconds to minutes on a GPU). `TORCH_LOGS=recompiles` names the guard that failed."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.after_first_epoch: int | None = None

    def epoch_end(self, epoch: int) -> str | None:
        """Call at each epoch end (1-based); returns a warning when graphs were compiled after the first epoch."""

        if not self.enabled:
            return None
        now = compat.compiled_graph_count()
        if self.after_first_epoch is None:
            self.after_first_epoch = now
            return None
        new, self.after_first_epoch = now - self.after_first_epoch, now
        if new <= 0:
            return None
        return (
            f"compile: {new} graph(s) compiled again in epoch {epoch} (a recompilation; run with "
            "TORCH_LOGS=recompiles to see which guard failed)"
        )
