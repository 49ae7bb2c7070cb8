"""DeepSpeed ZeRO-1/2/3: the backend classes, the JSON configuration rendered from ours, and Accelerate's plugin.

`ds_configs/zero<N>.json` (a top-level folder of the repository, packaged as yoloscale/templates/ds_configs/) are the templates (or the user's `ds_config=` / `--deepspeed FILE`). Fields we own are
written "auto" there and filled from TrainConfig; a concrete value that disagrees with ours is an error naming
both, so the JSON and the YOLO configuration can never silently say two different things.

Precision: DeepSpeed's `bf16`/`fp16` sections cast the whole model (yolo11x with ZeRO-2 then died with "CUDA error:
misaligned address" on a GPU), so both stay disabled and DeepSpeed's `torch_autocast` section runs the
model under autocast with fp32 master weights, as DDP does. fp16 needs two repairs of DeepSpeed 0.19.8, both here:
its loss scaling under `torch_autocast` never lowers the scale (`use_dynamic_loss_scaler`), and cuDNN's fp16
BatchNorm fails on weights at unaligned offsets of DeepSpeed's flat buffers (`AlignedBatchNorm2d`).

Gradient reduction stays in fp32, as DDP's and FSDP2's: by default `torch_autocast` tags Conv2d/Linear weights to
reduce their gradients in the autocast dtype (bf16), whatever `communication_data_type` says. That alone moved ZeRO-2
off DDP from the first update (CPU, 2 ranks, yolov8n, bf16, no clipping: loss 4e-3 apart after one update, 0.35 after
three); with `lower_precision_safe_modules: []` the two runs gave the same losses for 12 steps.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from accelerate.utils import DeepSpeedPlugin
from torch import nn

from yoloscale.backend.base import FP16_INIT_SCALE, Backend, autocast_forward
from yoloscale.compat import check_zero_optimizer, dynamic_loss_scaler
from yoloscale.distributed.rendezvous import free_port
from yoloscale.errors import UserError
from yoloscale.training.musgd import ShardedMuSGD

if TYPE_CHECKING:
    from yoloscale.config import TrainConfig

AUTOCAST_DTYPE = {"bf16": "bfloat16", "fp16": "float16"}


def template_path(stage: int) -> Path:
    """The shipped ZeRO-<stage> template (package data: found in a wheel as in a source checkout)."""
    return Path(str(resources.files("yoloscale") / "templates" / "ds_configs" / f"zero{stage}.json"))


class Zero(Backend):
    """DeepSpeed ZeRO through Accelerate's DeepSpeed plugin; DeepSpeed's engine owns model and optimizer, clips and
    steps inside the backward at the end of an accumulation window."""

    stage = 0
    accelerate_name = "deepspeed"
    layout = "zero"
    sharded = True
    replicates_model = False

    @property
    def name(self) -> str:
        return f"zero{self.stage}"

    def validate(self) -> None:
        cfg = self.cfg
        if cfg.offload == "params" and self.stage != 3:
            raise UserError(
                f"offload=params needs backend=fsdp or zero3 (only they shard parameters); got backend={self.name}."
            )
        if cfg.sync_bn and self.stage == 3:
            raise UserError(
                "sync_bn=True is not supported with backend=zero3 (ZeRO-3 partitions the BatchNorm "
                "parameters that SyncBatchNorm reads outside DeepSpeed's hooks); use zero2 or fsdp."
            )

    def plugins(self, precision: str, device_batch: int, world: int) -> dict:
        return {"deepspeed_plugin": deepspeed_plugin(self.cfg, precision, device_batch, world)}

    def build_accelerator(self, device_batch: int):
        if "RANK" not in os.environ and self.uses_cuda():
            # one process started without a launcher (`yoloscale train backend=zero2` on one GPU): DeepSpeed still
            # needs a process group, which Accelerate makes only from a launcher's variables; they are set here
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        return super().build_accelerator(device_batch)

    def set_device_batch(self, accelerator, device_batch: int, world: int) -> None:
        config = accelerator.state.deepspeed_plugin.deepspeed_config  # read by Accelerate's prepare
        config["train_micro_batch_size_per_gpu"], config["train_batch_size"] = device_batch, device_batch * world

    def accelerate_precision(self, precision: str) -> str:
        return "fp32"  # DeepSpeed's torch_autocast section does the mixed precision

    def wrap(self, accelerator, model: nn.Module) -> nn.Module:
        model = super().wrap(accelerator, model)
        if self.precision_name == "fp16":
            align_batchnorm_params(model)  # cuDNN's fp16 BatchNorm and DeepSpeed's flat buffers
        if self.stage == 3:
            gather_whole_layers(model)  # before the engine registers its hooks
        return model

    def prepare(self, accelerator, model: nn.Module, optimizer: torch.optim.Optimizer):

        model, optimizer = accelerator.prepare(model, optimizer)
        zero_optimizer = optimizer.optimizer  # DeepSpeed's, which wraps ours
        if isinstance(zero_optimizer.optimizer, ShardedMuSGD):
            zero_optimizer.optimizer.layout = ZeroLayout(zero_optimizer)
        # DeepSpeed's torch_autocast hands the model's bf16 outputs to the loss as they are, so on ZeRO the YOLO
        # loss (BCE, DFL, IoU) was computed in bf16: on the same weights cls_loss came out ~3% off DDP's, both ways
        # across a resume. The loss gets fp32 outputs, as Accelerate gives DDP's.
        autocast_forward(model.module, autocast=None)
        if self.precision_name == "fp16":
            use_dynamic_loss_scaler(model, FP16_INIT_SCALE)
        return model, optimizer

    def no_sync(self, model: nn.Module):
        return contextlib.nullcontext()  # DeepSpeed is told the accumulation boundary instead (backward)

    def backward(self, loss: torch.Tensor, model: nn.Module, sync: bool, accelerator=None) -> None:
        if accelerator is not None:
            accelerator.backward(loss)  # Accelerate's wrapper: the boundary from sync_gradients, backward, step
            return
        model.set_gradient_accumulation_boundary(is_boundary=sync)
        model.backward(loss)
        if sync:
            model.step()

    def step(self, model: nn.Module, optimizer, max_norm: float, accelerator=None) -> torch.Tensor:
        """The engine already clipped and stepped inside backward; it skips a step with a non-finite gradient norm
        itself (fp16: an overflow, its loss scale halved) and reports the norm as inf."""
        engine = self.engine(accelerator) or model
        device = accelerator.device if accelerator is not None else next(engine.module.parameters()).device
        norm = engine.get_global_grad_norm()  # a tensor or a float
        if norm is None:
            return torch.zeros((), device=device)
        return (~torch.isfinite(torch.as_tensor(norm, dtype=torch.float32, device=device))).float()

    def can_load_own(self, saved_world: int, world: int) -> bool:
        return saved_world == world  # DeepSpeed loads its partitions on the world size that wrote them only

    def engine(self, accelerator):
        return accelerator.deepspeed_engine_wrapped.engine if accelerator is not None else None


class Zero1(Zero):
    stage = 1
    sharded_state = (False, False, True)


class Zero2(Zero):
    stage = 2
    sharded_state = (False, True, True)


class Zero3(Zero):
    stage = 3
    sharded_state = (True, True, True)


def _template(cfg: TrainConfig, stage: int) -> tuple[dict, str]:
    path = Path(cfg.ds_config) if cfg.ds_config else template_path(stage)
    if not path.is_file():
        raise UserError(f"DeepSpeed config '{path}' not found.")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config '{path}' line {e.lineno}: not valid JSON ({e.msg}).") from None


def _own(ds: dict, dotted: str, value: Any, ours: str, source: str) -> None:
    """Set `dotted` to `value` where the JSON says "auto" or nothing; refuse a different concrete value."""
    *parents, leaf = dotted.split(".")
    node = ds
    for p in parents:
        node = node.setdefault(p, {})
    current = node.get(leaf, "auto")
    if current == "auto":
        node[leaf] = value
    elif current != value and not (isinstance(value, float) and current == value):
        raise UserError(
            f"DeepSpeed config '{source}' sets {dotted}={current!r} but our configuration says "
            f'{ours} ({value!r}); make them agree or write "auto" in the JSON.'
        )


def render_ds_config(cfg: TrainConfig, precision: str, device_batch: int, world: int) -> dict:
    """The DeepSpeed configuration for this run, every field we own filled in and checked. DeepSpeed's own
    accumulation stays at 1: the trainer accumulates (Ultralytics' warmup ramps the count) and marks the boundaries."""
    stage = int(cfg.backend.removeprefix("zero"))
    ds, source = _template(cfg, stage)
    ds = copy.deepcopy(ds)
    _own(ds, "zero_optimization.stage", stage, f"backend={cfg.backend}", source)
    _own(ds, "train_micro_batch_size_per_gpu", device_batch, "the per-device batch", source)
    _own(ds, "gradient_accumulation_steps", 1, "accumulate= (yoloscale accumulates; DeepSpeed's count stays 1)", source)
    _own(ds, "train_batch_size", device_batch * world, "the global batch (per micro-step)", source)
    _own(ds, "gradient_clipping", float(cfg.grad_clip), "grad_clip", source)
    optimizer_device = "cpu" if cfg.offload in ("optimizer", "params") else "none"
    _own(ds, "zero_optimization.offload_optimizer.device", optimizer_device, f"offload={cfg.offload}", source)
    if stage == 3:
        _own(
            ds,
            "zero_optimization.offload_param.device",
            "cpu" if cfg.offload == "params" else "none",
            f"offload={cfg.offload}",
            source,
        )
    autocast = precision in AUTOCAST_DTYPE
    _own(ds, "torch_autocast.enabled", autocast, f"precision={precision}", source)
    if autocast:
        _own(ds, "torch_autocast.dtype", AUTOCAST_DTYPE[precision], f"precision={precision}", source)
        # fp32 gradient reduction unless the user's JSON lists modules to reduce in bf16 (module docstring)
        ds["torch_autocast"].setdefault("lower_precision_safe_modules", [])
    elif ds["torch_autocast"].get("dtype") == "auto":
        # DeepSpeed validates the dtype even when autocast is off ("'auto' is not a valid DtypeEnum", fp32 run)
        del ds["torch_autocast"]["dtype"]
    for whole_model_cast in ("bf16", "fp16"):
        _own(
            ds,
            f"{whole_model_cast}.enabled",
            False,
            "autocast with fp32 master weights (DeepSpeed's whole-model cast crashed on yolo11x)",
            source,
        )
    # Our own optimizers (SGD with Ultralytics' groups, fused AdamW) are not on DeepSpeed's tested list.
    ds.setdefault("zero_allow_untested_optimizer", True)
    if optimizer_device == "cpu":
        # Offloaded, DeepSpeed insists on its own CPU Adam ("ZeRO-Offload with a client provided optimizer": every
        # offload run with YOLO's SGD stopped there). Ours steps the fp32 partitions in CPU memory instead.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def deepspeed_plugin(cfg: TrainConfig, precision: str, device_batch: int, world: int):

    try:
        import deepspeed  # noqa: F401
        import transformers  # noqa: F401  (Accelerate's DeepSpeedPlugin imports it)
    except ImportError as e:
        raise UserError(f"backend={cfg.backend} needs DeepSpeed: pip install 'yoloscale[deepspeed]' ({e}).") from None
    return DeepSpeedPlugin(hf_ds_config=render_ds_config(cfg, precision, device_batch, world))


def gather_whole_layers(model) -> list[int]:
    """ZeRO-3: gather and release layers of `model.model` (Conv, C3k2, SPPF, C2PSA, ...) as one unit each, the units
    of our FSDP2 wrap policy. By default ZeRO-3 hooks every submodule (yolo11x: ~700, most of them a BatchNorm or a
    small conv) and the per-module bookkeeping on the host dominates the step: on the CPU (yolo11x, 32 px, so that
    the host work shows) a ZeRO-3 step took 6.8 s, 1.5 s with whole layers, 0.63 s for ZeRO-2. DeepSpeed fetches a
    "leaf" module whole in its pre-forward hook and does not hook its children. Two kinds of layer stay as they are:
    - the first: its input (the image) needs no gradient, so DeepSpeed's post-backward hook fires before the layer's
      own backward and releases the weights it needs ("size of tensor a (0) must match ...", seen on the CPU);
    - a layer with frozen parameters (Detect's DFL conv): DeepSpeed reduces a leaf's gradients once all of its
      parameters have one, a frozen one never does, and the whole step's update came out wrong.
    Shared parameter-free modules are copied first (`unshare_stateless_modules`: the shared SiLU).
    Returns the indices of the layers gathered whole (tests/distributed/sharded_parity_worker.py checks the result against DDP)."""
    # DeepSpeed is optional (pip install yoloscale[deepspeed]): imported only by the ZeRO backends
    from deepspeed.utils import set_z3_leaf_module

    unshare_stateless_modules(model)
    leaves = []
    for i, layer in enumerate(model.model):
        params = list(layer.parameters())
        if i > 0 and params and all(p.requires_grad for p in params):
            set_z3_leaf_module(layer, True)
            leaves.append(i)
    return leaves


def unshare_stateless_modules(model) -> int:
    """ZeRO-3: give every parent its own copy of a parameter-free module that several parents share; returns how
    many were copied. Ultralytics' Conv uses ONE class-level `nn.SiLU()` (`Conv.default_act`) in every conv of the
    model. ZeRO-3 registers its fetch/release hooks once per parent it walks, so that one SiLU carried 76 hooks
    (yolo11x: 38 parents outside the whole-layer units) and all ~500 of its calls per step ran all of them: a 2.6 s
    ZeRO-3 step on the CPU (yolo11x, 32 px), and on two GPUs 0.13x DDP's img/s. A copy
    changes nothing else: the module has no parameters or buffers, so the state dict and the numbers stay the same."""
    seen, copied = set(), 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            stateless = next(iter(child.parameters()), None) is None and next(iter(child.buffers()), None) is None
            if id(child) in seen and stateless:
                setattr(parent, name, copy.deepcopy(child))
                copied += 1
            seen.add(id(child))
    return copied


def use_dynamic_loss_scaler(engine, init_scale: float, window: int = 2000) -> None:
    """fp16: scale the loss with DeepSpeed's own dynamic loss scaler instead of the GradScaler that `torch_autocast`
    installs. DeepSpeed 0.19.8 multiplies the loss by that GradScaler's scale, but on an overflow its ZeRO step
    returns before calling the GradScaler's update(), so the scale never comes down: yolo11x overflowed on every step
    on two GPUs, yolov8n on the CPU 12 times of 12 at the constant 65536. Its clipping and reported gradient norm also
    divide by its own loss scale (1.0), not the GradScaler's. DeepSpeed's DynamicLossScaler is the one the whole
    step reads (scale_if_loss, the overflow check, update_scale, unscale_and_clip_grads), on ZeRO-1/2 and ZeRO-3
    alike. Set like DDP's GradScaler: halve on every overflow (no hysteresis), double after `window` clean steps.
    It is saved with the optimizer state, so a resume continues with the scale it reached."""

    optimizer = engine.optimizer
    check_zero_optimizer(optimizer, "fp16 under torch_autocast")  # else the repair could silently do nothing
    optimizer.torch_autocast_gradscaler = None
    optimizer.loss_scaler = dynamic_loss_scaler()(
        init_scale=init_scale,
        scale_window=window,
        min_scale=1.0,
        delayed_shift=1,
        consecutive_hysteresis=False,
        raise_error_at_min_scale=False,
        dtype=torch.float16,
    )
    optimizer.dynamic_loss_scale = True


class AlignedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that hands cuDNN 16-byte aligned weight and bias under fp16 input. DeepSpeed keeps parameters as
    views into flat buffers, at any 4-byte offset; cuDNN's BatchNorm on an fp16 input with fp32 weights failed
    ('CUDNN_STATUS_EXECUTION_FAILED', or later 'misaligned address') when the weight started 4 or 8 bytes past a
    16-byte boundary (benchmarks/gpu/batchnorm_alignment.py reproduces it). Only then are the two small tensors
    cloned (fresh allocations are aligned); the clone passes the gradient back to the parameter. The check runs in
    forward, after ZeRO-3's hooks have gathered the weights. The state dict is that of BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self._parameters
        weight, bias = params["weight"], params["bias"]
        if x.dtype != torch.float16 or weight is None or (weight.data_ptr() % 16 == 0 and bias.data_ptr() % 16 == 0):
            return super().forward(x)
        params["weight"], params["bias"] = weight.clone(), bias.clone()
        try:
            return super().forward(x)
        finally:
            params["weight"], params["bias"] = weight, bias


def align_batchnorm_params(model: nn.Module) -> int:
    """Make every BatchNorm2d of `model` an AlignedBatchNorm2d (fp16 on DeepSpeed); returns how many.
    SyncBatchNorm (`sync_bn=True`) is left as it is: its training kernels are torch's own, not cuDNN's, and ran on
    misaligned weights (benchmarks/gpu/batchnorm_alignment.py)."""
    count = 0
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = AlignedBatchNorm2d
            count += 1
    return count


def stage_of_file(path: str) -> int | None:
    """The ZeRO stage a DeepSpeed JSON names (for `--deepspeed FILE` given by the launcher), if any."""
    try:
        stage = json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage")
    except (OSError, json.JSONDecodeError):
        return None
    return stage if isinstance(stage, int) else None


class ZeroLayout:
    """Whole matrices from DeepSpeed ZeRO's flat fp32 partitions, for ShardedMuSGD (musgd.py): one collective per
    Muon group and step.

    ZeRO-1/2 (DeepSpeed 0.19.8): each parameter's slice of a rank's partition is `param._hp_mapping`
    (`hp_fragment_address` in the flat partition, `lp_fragment_address` in the flattened parameter; a parameter may
    straddle ranks or have no slice here). The whole tensors come from an all-reduce of a zeroed buffer into which
    every rank writes its slices, as DeepSpeed's own `get_full_hp_param` does, once per group.
    ZeRO-3: every parameter has an equal-size (padded) partition on each rank, at `grad_position` in the sub-group's
    flat fp32 tensor; one all-gather of the flat tensors gives every partition of every parameter."""

    def __init__(self, zero_optimizer):

        stage3 = hasattr(zero_optimizer, "fp32_partitioned_groups_flat")
        check_zero_optimizer(zero_optimizer, "stage 3" if stage3 else "stage 1/2")

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.by_flat: dict[int, tuple] = {}
        if hasattr(zero_optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2
            for i, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups):
                entries, offset = [], 0
                for p in zero_optimizer.bit16_groups[i]:
                    m = p._hp_mapping  # None: no slice of this parameter in this rank's partition
                    frag = m and (m.hp_fragment_address.start, m.lp_fragment_address.start, m.lp_fragment_address.numel)
                    entries.append((tuple(p.shape), offset, p.numel(), frag))
                    offset += p.numel()
                self.by_flat[id(flat)] = ("reduce", entries, offset, zero_optimizer.real_dp_process_group[i])
        else:  # ZeRO-3
            subgroups: dict[int, list] = {}
            for group in zero_optimizer.fp16_groups:
                for p in group:
                    sub, start, numel = zero_optimizer.grad_position[zero_optimizer.get_param_id(p)]
                    subgroups.setdefault(sub, []).append((tuple(p.ds_shape), start, numel, p.ds_numel))
            for sub, flat in enumerate(zero_optimizer.fp32_partitioned_groups_flat):
                self.by_flat[id(flat)] = ("gather", subgroups.get(sub, []), 0, zero_optimizer.dp_process_group)

    def whole(self, params: list[torch.Tensor], local: list[torch.Tensor]) -> list[torch.Tensor]:

        (flat,), (u,) = params, local
        how, entries, total, group = self.by_flat[id(flat)]
        if how == "reduce":
            buf = torch.zeros(total, dtype=u.dtype, device=u.device)
            for _, offset, _, frag in entries:
                if frag is not None:
                    hp, lp, n = frag
                    buf[offset + lp : offset + lp + n] = u[hp : hp + n]
            dist.all_reduce(buf, group=group)
            return [buf[offset : offset + numel].view(shape) for shape, offset, numel, _ in entries]
        parts = [torch.empty_like(u) for _ in range(self.world)]
        dist.all_gather(parts, u.contiguous(), group=group)
        return [
            torch.cat([part[start : start + n] for part in parts])[:numel].view(shape)
            for shape, start, n, numel in entries
        ]

    def local(self, params: list[torch.Tensor], whole: list[torch.Tensor]) -> list[torch.Tensor]:
        (flat,) = params
        how, entries, _, _ = self.by_flat[id(flat)]
        out = torch.zeros_like(flat)
        if how == "reduce":
            for (_, _, _, frag), w in zip(entries, whole):
                if frag is not None:
                    hp, lp, n = frag
                    out[hp : hp + n] = w.flatten()[lp : lp + n]
            return [out]
        for (_, start, n, numel), w in zip(entries, whole):
            padded = torch.nn.functional.pad(w.flatten(), (0, n * self.world - numel))
            out[start : start + n] = padded[self.rank * n : (self.rank + 1) * n]
        return [out]
