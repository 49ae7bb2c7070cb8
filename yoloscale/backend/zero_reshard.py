"""DeepSpeed ZeRO checkpoints as whole tensors, and whole tensors into a ZeRO engine of any world size.

A ZeRO checkpoint holds each rank's slice of flat buffers, and DeepSpeed loads it only on the world size that wrote
it. DeepSpeed's own way across world sizes, the universal checkpoint (`ds_to_universal`), converts Adam's states
only (`exp_avg`, `exp_avg_sq`; it fails on SGD's `momentum_buffer`, YOLO's default optimizer). So we go in two
steps, both with DeepSpeed's code:
1. `read_zero_weights`, `read_zero`: whole per-parameter tensors from the files, with the merge functions of
   DeepSpeed's `zero_to_fp32` (written for the fp32 master weights; the optimizer states are sliced the same way, so
   they go through the same functions);
2. `write_zero`: whole tensors into the engine built for this world, through DeepSpeed's `safe_set_full_*` API,
   which knows this world's partition layout.
full_state.py uses both to resume across world sizes and across backends.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

import torch

from yoloscale.checkpoint.trusted import load_weights_only
from yoloscale.compat import check_zero_optimizer, zero_to_fp32


def _consolidate(flat_groups: list[list[torch.Tensor]], stage: int, model_states, paddings) -> dict[str, torch.Tensor]:
    """Whole per-parameter tensors from each rank's flat partitions (one list of groups per rank)."""
    z = zero_to_fp32()

    full: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 prints a line per call
        if stage <= 2:
            z._zero2_merge_trainable_params(full, len(flat_groups), flat_groups, model_states, paddings)
        else:
            z._zero3_merge_trainable_params(full, len(flat_groups), flat_groups, model_states)
    return z.to_torch_tensor(full)


def _copy(value: Any) -> Any:
    return value.clone() if torch.is_tensor(value) else value


def read_zero_weights(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """A ZeRO checkpoint folder (`CKPT/pytorch_model`) -> the fp32 weights and buffers, whole."""
    z = zero_to_fp32()

    with contextlib.redirect_stdout(io.StringIO()):
        return z.get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(ckpt_dir), os.path.basename(ckpt_dir))


def read_zero(ckpt_dir: str) -> tuple[dict[str, dict[str, Any]], dict]:
    """A ZeRO checkpoint folder (`CKPT/pytorch_model`) -> (optimizer state per parameter name, the engine's step
    counters)."""
    z = zero_to_fp32()

    model_files = z.get_model_state_files(ckpt_dir)
    model_states = z.parse_model_states(model_files)
    files = [load_weights_only(f, deepspeed=True)["optimizer_state_dict"] for f in z.get_optim_files(ckpt_dir)]
    stage = int(files[0]["zero_stage"])
    if stage <= 2:  # torch's state dict of the flat partitions; every group padded at the end of the last rank's
        per_rank = [
            [s["base_optimizer_state"]["state"][g] for g in sorted(s["base_optimizer_state"]["state"])] for s in files
        ]
        per_rank = [
            [
                {
                    k: v[: v.numel() - s["group_paddings"][g]] if torch.is_tensor(v) and v.dim() == 1 else v
                    for k, v in st.items()
                }
                for g, st in enumerate(groups)
            ]
            for groups, s in zip(per_rank, files)
        ]
        paddings = files[0].get("param_alignment_paddings")
    else:
        per_rank = [
            [s["optimizer_state_dict"]["state"][g] for g in sorted(s["optimizer_state_dict"]["state"])] for s in files
        ]
        paddings = None
    flat_keys = sorted({k for st in per_rank[0] for k, v in st.items() if torch.is_tensor(v) and v.dim() == 1})
    by_key = {
        k: _consolidate([[g[k] for g in groups] for groups in per_rank], stage, model_states, paddings)
        for k in flat_keys
    }
    names = [list(shapes) for shapes in model_states[0].param_shapes]  # per group, in the flat buffers' order
    optim: dict[str, dict[str, Any]] = {}
    for group_names, group_state in zip(names, per_rank[0]):
        scalars = {k: v for k, v in group_state.items() if k not in flat_keys}  # AdamW's step: one per group
        for n in group_names:  # a copy each: torch's AdamW increments every parameter's step tensor in place
            optim[n] = {**{k: by_key[k][n] for k in flat_keys}, **{k: _copy(v) for k, v in scalars.items()}}
    saved = load_weights_only(model_files[0], deepspeed=True)
    counters = {k: saved[k] for k in ("global_steps", "global_samples", "skipped_steps")}
    return optim, counters


def _set_zero3_state(param, value: torch.Tensor, key: str) -> None:
    """ZeRO-3's `safe_set_full_optimizer_state`, for parameters of any size: DeepSpeed 0.19.8 slices the unpadded
    value and fails on the last rank when the size is not a multiple of the world size ("start (2) + length (2)
    exceeds dimension size (3)", a 3-element bias on 2 ranks). Padded here as DeepSpeed pads the partitions."""
    optimizer = param._z3_optimizer
    part, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    n, rank = part.numel(), optimizer._get_param_partition_rank(param)
    world = optimizer._get_param_partition_world_size(param)
    part.copy_(torch.nn.functional.pad(value.flatten(), (0, n * world - value.numel()))[n * rank : n * rank + n])


def _base_flat_partitions(optimizer) -> list[torch.Tensor]:
    """The flat fp32 tensors the wrapped torch optimizer steps on, one per group (ZeRO-1/2) or sub-group (ZeRO-3)."""
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):
        return optimizer.fp32_partitioned_groups_flat
    return optimizer.single_partition_of_fp32_groups


def write_zero(
    engine,
    weights: dict[str, torch.Tensor],
    optim: dict[str, dict[str, Any]],
    group_names: list[list[str]],
    counters: dict | None = None,
) -> None:
    """Whole weights and per-parameter optimizer states into `engine` (any ZeRO stage, any world size).
    `group_names`: the trainable parameter names of each optimizer group, in order."""
    # DeepSpeed is optional (pip install yoloscale[deepspeed]): imported only by the ZeRO backends
    import deepspeed
    from deepspeed.utils import safe_set_full_optimizer_state

    module, optimizer = engine.module, engine.optimizer
    check_zero_optimizer(optimizer, "stage 3" if hasattr(optimizer, "fp32_partitioned_groups_flat") else "stage 1/2")
    # Weights: into the module's (gathered, for ZeRO-3) parameters, then DeepSpeed copies them into its fp32
    # masters. Our parameters are fp32 (autocast, no DeepSpeed cast), so nothing is rounded on the way.
    params = list(module.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=0) if hasattr(params[0], "ds_id") else None
    with gather or contextlib.nullcontext():
        missing, unexpected = module.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    optimizer.refresh_fp32_params()

    # Optimizer states: create them where no step has yet (torch creates them lazily), then fill each parameter's
    # slice of them. Per-group values (AdamW's step) come from the group's first parameter.
    inner, flats = optimizer.optimizer, _base_flat_partitions(optimizer)
    # torch keeps AdamW's step on the host unless the optimizer is fused or capturable
    step_device = flats[0].device if inner.defaults.get("fused") or inner.defaults.get("capturable") else "cpu"
    for flat, names in zip(flats, group_names):
        first = optim.get(names[0], {}) if names else {}
        st = inner.state[flat]
        for k, v in first.items():
            if torch.is_tensor(v) and v.shape == weights[names[0]].shape:  # per element: filled below
                st[k] = torch.zeros_like(flat)
            else:  # one value for the group
                st[k] = _copy(v).to(step_device) if torch.is_tensor(v) else v
    if hasattr(optimizer, "_hp_optimizer_states_linked"):
        # ZeRO-1/2 link each parameter to its slice of the states once, after the first step; DeepSpeed 0.19.8 does
        # that after the first *group's* step, so the other groups' states stay unlinked for good. Link now.
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    for name, p in module.named_parameters():
        zero3 = hasattr(p, "ds_id")
        for k, v in optim.get(name, {}).items():
            if torch.is_tensor(v) and v.shape == (p.ds_shape if zero3 else p.shape):
                (_set_zero3_state if zero3 else safe_set_full_optimizer_state)(p, v.to(flats[0].device), k)
    if counters:  # as DeepSpeed's own load restores them
        engine.global_steps, engine.global_samples = counters["global_steps"], counters["global_samples"]
        engine.skipped_steps = counters["skipped_steps"]
