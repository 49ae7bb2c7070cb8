"""Resume a checkpoint on another backend, or a ZeRO checkpoint on another number of processes.

Each backend saves its own layout through Accelerate's `save_state`, and loads only that:
- DDP: `model.safetensors` and `optimizer.bin` (torch's optimizer state dict, parameters numbered in order);
- FSDP2: DCP folders `pytorch_model_fsdp_0/` and `optimizer_0/` (each rank wrote its shards; DCP itself reshards
  them for another world size);
- DeepSpeed: `pytorch_model/`, each rank's ZeRO partitions, loadable on the world size that wrote them only.
Across layouts we go through whole tensors: the weights {name: tensor} and each parameter's optimizer state
{name: {key: value}}, the "full state dict" of torch.distributed.checkpoint.state_dict. `read_full_state` reads any
layout into it and `write_full_state` writes it into whatever this run built (torch's set_*_state_dict for DDP and
FSDP2, zero_reshard.py for ZeRO). Only the model and optimizer need this: the RNG states (and a GradScaler's) are
read from Accelerate's own files. tests/distributed/full_state_worker.py checks every layout into every kind of run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

from yoloscale.backend.zero_reshard import read_zero, read_zero_weights, write_zero
from yoloscale.checkpoint.trusted import load_weights_only
from yoloscale.compat import load_accelerator_state, read_dcp


@dataclass
class FullState:
    weights: dict[str, torch.Tensor]  # parameters and buffers, by name
    optim: dict[str, dict[str, Any]]  # each parameter's optimizer state (momentum_buffer, exp_avg, step, ...), by name
    counters: dict = field(default_factory=dict)  # DeepSpeed's step counters, when DeepSpeed wrote the checkpoint


def optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The parameter names of each group of `optimizer` (as built: before DeepSpeed flattens its groups)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def _read_dcp(folder: Path) -> dict:
    """A whole DCP checkpoint in this process (every rank reads all shards; YOLO models are small)."""

    return read_dcp(folder)


def read_weights(ckpt: Path, layout: str) -> dict[str, torch.Tensor]:
    """The model's weights and buffers in the checkpoint folder `ckpt` written in `layout` (ddp | fsdp | zero, a
    backend's `layout`), whole (no GPU, no process group needed: `yoloscale export` uses it too)."""
    ckpt = Path(ckpt)
    if layout == "ddp":
        return {k.removeprefix("module."): v for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    if layout == "fsdp":
        return _read_dcp(ckpt / "pytorch_model_fsdp_0")["model"]

    return read_zero_weights(str(ckpt / "pytorch_model"))


def read_full_state(ckpt: Path, layout: str, names: list[list[str]]) -> FullState:
    """The checkpoint folder `ckpt`, written in `layout`, as whole tensors. `names`: optimizer_names()."""
    ckpt = Path(ckpt)
    weights = read_weights(ckpt, layout)
    if layout == "ddp":
        numbered = load_weights_only(ckpt / "optimizer.bin")["state"]
        in_order = [n for group in names for n in group]
        return FullState(weights, {in_order[i]: st for i, st in numbered.items()})
    if layout == "fsdp":
        return FullState(weights, _read_dcp(ckpt / "optimizer_0")["optimizer"]["state"])

    optim, counters = read_zero(str(ckpt / "pytorch_model"))
    return FullState(weights, optim, counters)


def write_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, full: FullState, names: list[list[str]], engine=None
) -> None:
    """Whole tensors into this run: `model` unwrapped (FSDP2's sharded module as it is), `optimizer` the torch
    optimizer, `engine` the DeepSpeed engine under ZeRO (which owns model and optimizer then)."""
    if engine is not None:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        write_zero(engine, full.weights, full.optim, [[n for n in g if n in trainable] for g in names], full.counters)
        return

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, full.weights, options=options)
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": group_names}
        for g, group_names in zip(optimizer.param_groups, names)
    ]
    set_optimizer_state_dict(model, optimizer, {"state": full.optim, "param_groups": groups}, options=options)


def load_foreign(
    accelerator, ckpt: Path, saved_layout: str, model: nn.Module, optimizer, names: list[list[str]], engine=None
) -> None:
    """Accelerate's load_state for a checkpoint of another layout: model and optimizer through whole tensors, then
    Accelerate's RNG states (and GradScaler, where both runs have one) from its own files. `model` unwrapped;
    `engine`: DeepSpeed's, under ZeRO (it owns model and optimizer then)."""

    inner = getattr(optimizer, "optimizer", optimizer)
    write_full_state(model, inner, read_full_state(ckpt, saved_layout, names), names, engine)
    scaler = accelerator.scaler if accelerator.scaler is not None and (Path(ckpt) / "scaler.pt").is_file() else None
    load_accelerator_state()(str(ckpt), [], [], [], [], accelerator.process_index, scaler=scaler)
