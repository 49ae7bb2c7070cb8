"""Resume a DeepSpeed ZeRO checkpoint on another number of processes (e.g. 2 GPUs -> 1, 1 -> 2).

A ZeRO checkpoint holds each rank's slice of flat buffers, and DeepSpeed loads it only on the world size that wrote
it. DeepSpeed's own way across world sizes, the universal checkpoint (`ds_to_universal`), converts Adam's states
only (`exp_avg`, `exp_avg_sq`; it fails on SGD's `momentum_buffer`, YOLO's default optimizer). So we do it in two
steps, both with DeepSpeed's code:
1. consolidate: full per-parameter tensors from the files, with the merge functions of DeepSpeed's `zero_to_fp32`
   (written for the fp32 master weights; the optimizer states are sliced the same way, so they go through the same
   functions);
2. re-partition: write the full tensors into the engine built for the new world through DeepSpeed's
   `safe_set_full_*` API, which knows that world's partition layout.
Weights, BatchNorm buffers, every optimizer state (SGD momentum, AdamW moments and step) and the engine's step
counters are restored; tests/zero_reshard_worker.py checks each against the run that saved it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from collections.abc import Iterator

import torch


def _consolidate(flat_groups: list[list[torch.Tensor]], stage: int, model_states, paddings) -> dict[str, torch.Tensor]:
    """Full per-parameter tensors from each rank's flat partitions (one list of groups per rank)."""
    from deepspeed.utils import zero_to_fp32 as z

    full: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 prints a line per call
        if stage <= 2:
            z._zero2_merge_trainable_params(full, len(flat_groups), flat_groups, model_states, paddings)
        else:
            z._zero3_merge_trainable_params(full, len(flat_groups), flat_groups, model_states)
    return z.to_torch_tensor(full)


def read_optimizer_states(ckpt_dir: str) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict]]:
    """From a ZeRO checkpoint folder: {state name: {parameter name: full tensor}} for every per-element optimizer
    state (SGD momentum_buffer, AdamW exp_avg/exp_avg_sq), and each group's other states (AdamW's step)."""
    from deepspeed.utils import zero_to_fp32 as z

    model_states = z.parse_model_states(z.get_model_state_files(ckpt_dir))
    files = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
             for f in z.get_optim_files(ckpt_dir)]  # fmt: skip
    stage = int(files[0]["zero_stage"])
    if stage <= 2:  # a list of group states, each without the group's padding except on the last rank
        per_rank = [[s["base_optimizer_state"]["state"][g] for g in sorted(s["base_optimizer_state"]["state"])]
                    for s in files]  # fmt: skip
        pads = [s["group_paddings"] for s in files]
        per_rank = [[{k: v[: v.numel() - pad[g]] if torch.is_tensor(v) and v.dim() == 1 else v for k, v in st.items()}
                     for g, st in enumerate(groups)] for groups, pad in zip(per_rank, pads)]  # fmt: skip
        paddings = files[0].get("param_alignment_paddings")
    else:
        per_rank = [[s["optimizer_state_dict"]["state"][g] for g in sorted(s["optimizer_state_dict"]["state"])]
                    for s in files]  # fmt: skip
        paddings = None
    first = per_rank[0]
    flat_keys = sorted({k for st in first for k, v in st.items() if torch.is_tensor(v) and v.dim() == 1})
    states = {k: _consolidate([[g[k] for g in groups] for groups in per_rank], stage, model_states, paddings)
              for k in flat_keys}  # fmt: skip
    scalars = [{k: v for k, v in st.items() if k not in flat_keys} for st in first]
    return states, scalars


def _base_flat_partitions(optimizer) -> list[torch.Tensor]:
    """The flat fp32 tensors the wrapped torch optimizer steps on, one per group (ZeRO-1/2) or sub-group (ZeRO-3)."""
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):
        return optimizer.fp32_partitioned_groups_flat
    return optimizer.single_partition_of_fp32_groups


def _set_zero3_state(param, value: torch.Tensor, key: str) -> None:
    """ZeRO-3's `safe_set_full_optimizer_state`, for parameters of any size: DeepSpeed 0.19.8 slices the unpadded
    value and fails on the last rank when the size is not a multiple of the world size ("start (2) + length (2)
    exceeds dimension size (3)", a 3-element bias on 2 ranks). Padded here as DeepSpeed pads the partitions."""
    optimizer = param._z3_optimizer
    part, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    n, rank = part.numel(), optimizer._get_param_partition_rank(param)
    world = optimizer._get_param_partition_world_size(param)
    part.copy_(torch.nn.functional.pad(value.flatten(), (0, n * world - value.numel()))[n * rank : n * rank + n])


def load_resharded(engine, load_dir: str, tag: str, **_ignored) -> tuple[str, dict]:
    """Load `load_dir/tag` (written by any world size) into `engine`; the signature of `engine.load_checkpoint`."""
    import deepspeed
    from deepspeed.utils import safe_set_full_optimizer_state
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir = os.path.join(load_dir, tag)
    with contextlib.redirect_stdout(io.StringIO()):
        full = get_fp32_state_dict_from_zero_checkpoint(load_dir, tag)  # weights and buffers
    states, scalars = read_optimizer_states(ckpt_dir)
    module, optimizer = engine.module, engine.optimizer

    # Weights: into the module's (gathered, for ZeRO-3) parameters, then DeepSpeed copies them into its fp32
    # masters. Our parameters are fp32 (autocast, no DeepSpeed cast), so nothing is rounded on the way.
    params = list(module.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=0) if hasattr(params[0], "ds_id") else None
    with gather or contextlib.nullcontext():
        missing, unexpected = module.load_state_dict(full, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpt_dir} does not match the model: missing {missing}, unexpected {unexpected}")
    optimizer.refresh_fp32_params()

    # Optimizer states: create them where the first step has not yet (torch creates them lazily), then fill each
    # parameter's slice of them.
    inner, device = optimizer.optimizer, _base_flat_partitions(optimizer)[0].device
    for flat, group_scalars in zip(_base_flat_partitions(optimizer), scalars):
        st = inner.state[flat]
        for k in states:
            st.setdefault(k, torch.zeros_like(flat))
        st.update({k: v.clone() if torch.is_tensor(v) else v for k, v in group_scalars.items()})
    if hasattr(optimizer, "_hp_optimizer_states_linked"):
        # ZeRO-1/2 link each parameter to its slice of the states once, after the first step; DeepSpeed 0.19.8 does
        # that after the first *group's* step, so the other groups' states stay unlinked for good. Link now.
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    for name, p in module.named_parameters():
        for k, per_param in states.items():
            if name in per_param:
                set_state = _set_zero3_state if hasattr(p, "ds_id") else safe_set_full_optimizer_state
                set_state(p, per_param[name].to(device), k)

    # The engine's counters, as DeepSpeed's own load restores them.
    model_file = sorted(f for f in os.listdir(ckpt_dir) if f.endswith("model_states.pt"))[0]
    saved = torch.load(os.path.join(ckpt_dir, model_file), map_location="cpu", weights_only=False)
    engine.global_steps, engine.global_samples = saved["global_steps"], saved["global_samples"]
    engine.skipped_steps = saved["skipped_steps"]
    return ckpt_dir, {}


@contextlib.contextmanager
def resharding_loads(engine) -> Iterator[None]:
    """Within: `engine.load_checkpoint` (which Accelerate's `load_state` calls) is `load_resharded`."""
    engine.load_checkpoint = functools.partial(load_resharded, engine)
    try:
        yield
    finally:
        del engine.load_checkpoint  # the class's method again
