"""Every private API of another package that yoloscale touches, with the versions it was written for.

Private names (underscored, or internals that their package does not document) are imported here and nowhere else;
internals that are attributes of another package's objects (DeepSpeed's ZeRO optimizers) are listed here and checked
before use. `check(package)` verifies that each listed name exists in the installed version and stops with one line
naming what is missing, the installed version and the versions this was written for; the accessors below call it
the first time they are used. pyproject.toml bounds each package to the range tested, and CI pins it. Each accessor
imports what it wraps when first called: the private modules of torch, DeepSpeed (optional) and Optuna load only in
the runs that use them.
"""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import PackageNotFoundError, version

from yoloscale.errors import UserError

WRITTEN_FOR = {  # tested: CI (CPU) and the GPU machines
    "torch": "2.11.0 (GPU machines) and 2.14.1 (CI)",
    "deepspeed": "0.19.8",
    "accelerate": "1.15.0",
    "ultralytics": "8.4.190",
    "optuna": "5.0.0",
}

PRIVATE = {  # importable names, "module:attribute"
    "torch": [
        "torch.distributed.checkpoint.format_utils:_EmptyStateDictLoadPlanner",  # reading DCP folders whole
        "torch.distributed.checkpoint.format_utils:_load_state_dict",
        "torch.nn.modules.batchnorm:_BatchNorm",  # grad_ckpt: every BatchNorm kind
    ],
    "deepspeed": [
        "deepspeed.utils.zero_to_fp32:_zero2_merge_trainable_params",  # ZeRO checkpoints as whole tensors
        "deepspeed.utils.zero_to_fp32:_zero3_merge_trainable_params",
        "deepspeed.utils.zero_to_fp32:to_torch_tensor",
        "deepspeed.utils.zero_to_fp32:get_model_state_files",
        "deepspeed.utils.zero_to_fp32:parse_model_states",
        "deepspeed.utils.zero_to_fp32:get_optim_files",
        "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    ],
    "accelerate": [
        "accelerate.checkpointing:load_accelerator_state",  # RNG/scaler files of a checkpoint of another layout
        "accelerate.utils:convert_outputs_to_fp32",
        "accelerate.utils:get_mixed_precision_context_manager",
        "accelerate.utils.other:TORCH_SAFE_GLOBALS",  # what its weights-only loads of RNG states allow (numpy)
    ],
    "ultralytics": [
        "ultralytics.nn.tasks:torch_safe_load",  # weights-only loading with its allow-list (safe_only=)
        "ultralytics.optim.muon:muon_update",  # MuSGD's orthogonalisation, on whole matrices
        "ultralytics.engine.trainer:check_amp",  # replaced offline by bench/race (it downloads weights)
    ],
}

# Of Optuna's FrozenTrial: `_trial_id`, to act on a trial found with study.get_trials() (sweep/study.py): Optuna's
# public API reaches a trial by its id only from inside study.ask().

# Attributes of DeepSpeed's ZeRO optimizers read or set by backend/zero.py and backend/zero_reshard.py.
ZERO_OPTIMIZER = {
    "stage 1/2": [
        "single_partition_of_fp32_groups",
        "bit16_groups",
        "real_dp_process_group",
        "_hp_optimizer_states_linked",
        "_lazy_init_hp_params_optimizer_state",
        "refresh_fp32_params",
    ],
    "stage 3": [
        "fp32_partitioned_groups_flat",
        "fp16_groups",
        "grad_position",
        "get_param_id",
        "dp_process_group",
        "_get_fp32_opt_state_partition",
        "_get_param_partition_rank",
        "_get_param_partition_world_size",
        "refresh_fp32_params",
    ],
    "fp16 under torch_autocast": ["torch_autocast_gradscaler", "loss_scaler", "dynamic_loss_scale"],
}
# Of torch's Dynamo (compile.py): `torch._dynamo.config.recompile_limit` (called `cache_size_limit` before torch
# 2.6), the number of graphs kept per function; `automatic_dynamic_shapes`; and
# `torch._dynamo.utils.counters["stats"]["unique_graphs"]`, the number of graphs compiled so far.

# Optional, with a fallback (register_fused_sgd_for_dtensor): torch.distributed.tensor._ops._pointwise_ops's
# _register_single_dim_pointwise (torch 2.14) or list_pointwise_strategy + _ops.utils.register_op_strategy (2.11).
# And of their parameters: ZeRO-1/2 `_hp_mapping` (hp_fragment_address, lp_fragment_address); ZeRO-3 `ds_tensor`,
# `ds_numel`, `ds_shape`, `ds_id`, `_z3_optimizer`. Of torch's DTensor: `_local_tensor` (the rank's shard, in place).


def installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


@functools.cache
def check(package: str) -> None:
    """Every private name of `package` that we use exists, or one clear error."""
    for entry in PRIVATE[package]:
        module, _, name = entry.partition(":")
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            raise UserError(
                f"{package} {installed(package)} lacks {module}.{name}, which yoloscale uses; it was "
                f"written for {package} {WRITTEN_FOR[package]}."
            ) from None


def check_zero_optimizer(optimizer, part: str) -> None:
    """The DeepSpeed internals of `part` (a key of ZERO_OPTIMIZER) exist on this ZeRO optimizer."""
    missing = [a for a in ZERO_OPTIMIZER[part] if not hasattr(optimizer, a)]
    if missing:
        raise UserError(
            f"DeepSpeed {installed('deepspeed')}'s {type(optimizer).__name__} lacks {', '.join(missing)} "
            f"({part}), which yoloscale uses; it was written for DeepSpeed {WRITTEN_FOR['deepspeed']}."
        )


def _get(package: str, entry: str):
    check(package)
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


# --- accessors: the one place each private name is imported ---------------------------------------------------------
def zero_to_fp32():
    """DeepSpeed's zero_to_fp32 module (its merge functions are private)."""
    check("deepspeed")
    # DeepSpeed is optional (pip install yoloscale[deepspeed]): imported only by the ZeRO backends
    from deepspeed.utils import zero_to_fp32 as module

    return module


def dynamic_loss_scaler():
    return _get("deepspeed", "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler")


def read_dcp(folder) -> dict:
    """A whole DCP checkpoint folder in this process, without a process group."""
    from torch.distributed.checkpoint import FileSystemReader

    planner = _get("torch", "torch.distributed.checkpoint.format_utils:_EmptyStateDictLoadPlanner")
    load = _get("torch", "torch.distributed.checkpoint.format_utils:_load_state_dict")
    state: dict = {}
    load(state, storage_reader=FileSystemReader(folder), planner=planner(), no_dist=True)
    return state


def batchnorm_base():
    return _get("torch", "torch.nn.modules.batchnorm:_BatchNorm")


def load_accelerator_state():
    return _get("accelerate", "accelerate.checkpointing:load_accelerator_state")


def accelerate_safe_globals() -> list:
    return list(_get("accelerate", "accelerate.utils.other:TORCH_SAFE_GLOBALS"))


def convert_outputs_to_fp32(forward):
    return _get("accelerate", "accelerate.utils:convert_outputs_to_fp32")(forward)


def mixed_precision_context(native_amp, autocast_handler):
    return _get("accelerate", "accelerate.utils:get_mixed_precision_context_manager")(native_amp, autocast_handler)


def torch_safe_load():
    return _get("ultralytics", "ultralytics.nn.tasks:torch_safe_load")


def muon_update():
    return _get("ultralytics", "ultralytics.optim.muon:muon_update")


def offline_ultralytics_trainer() -> None:
    """Ultralytics' trainer without its online AMP check (it downloads weights): the answer it gives on a healthy
    GPU, True. For running its trainer beside ours (bench, race)."""
    check("ultralytics")
    import ultralytics.engine.trainer as trainer

    trainer.check_amp = lambda model: True


@functools.cache
def register_fused_sgd_for_dtensor() -> bool:
    """Let torch's fused SGD step FSDP2's DTensor parameters; False where that is not possible (foreach SGD then).

    The fused SGD kernel is elementwise like the fused AdamW kernel, which DTensor runs shard by shard, but torch
    (2.11 to 2.14) registers no sharding strategy for it ("aten._fused_sgd_.default does not have a sharding strategy
    registered"). We register the strategy the way this torch registers fused Adam's: torch 2.14 through
    `_register_single_dim_pointwise`, torch 2.11 through `register_op_strategy` with the list-pointwise rule."""
    import torch

    ops = (torch.ops.aten._fused_sgd_.default, torch.ops.aten._fused_sgd_.tensor_lr)
    try:
        from torch.distributed.tensor._ops import _pointwise_ops as pointwise
    except ImportError:
        return False
    try:
        if hasattr(pointwise, "_register_single_dim_pointwise"):
            for op in ops:
                pointwise._register_single_dim_pointwise(op)
        else:
            from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
            from torch.distributed.tensor._ops.utils import register_op_strategy

            for op in ops:
                register = register_op_strategy(op, schema_info=RuntimeSchemaInfo(needs_pytree=True))
                register(pointwise.list_pointwise_strategy)
    except (ImportError, AttributeError, TypeError):
        return False
    return True


def optuna_trial(study, frozen):
    """A live `optuna.trial.Trial` of a trial found with `study.get_trials()` (for set_user_attr/report from a
    worker or process other than the one that asked for it). Optuna's own `Trial(study, trial_id)`, as ask() builds
    it; the id is FrozenTrial's private `_trial_id`."""
    import optuna

    trial_id = getattr(frozen, "_trial_id", None)
    if trial_id is None:
        raise UserError(
            f"optuna {installed('optuna')}'s FrozenTrial lacks _trial_id, which yoloscale's sweeps use; "
            f"they were written for optuna {WRITTEN_FOR['optuna']}."
        )
    return optuna.trial.Trial(study, trial_id)


def configure_dynamo_for_layers(at_least: int) -> None:
    """compile.py's settings: Dynamo keeps `at_least` compiled graphs per function (one per distinct layer of a
    class), and a shape that changes does not make a graph dynamic by itself (only the batch dimension, marked, is):
    two graphs of one class's forward that both accept a layer would let a checkpointed layer recompute with
    another graph than its forward's (torch's checkpoint then refuses it; pytorch#166926)."""
    import torch._dynamo

    config = torch._dynamo.config
    config.automatic_dynamic_shapes = False
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), at_least))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * at_least)


def compiled_graph_count() -> int:
    """How many graphs Dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
