"""Resumable checkpoints, written atomically.

A checkpoint is a folder `RUN/checkpoints/step-NNNNNNNN/` holding Accelerate's state (model as safetensors,
optimizer, loss scaler, every rank's RNG states), our EMA (`ema.safetensors`) and `trainer_state.json`
(epoch, data position, counters). It is written as `.tmp-step-NNNNNNNN/`, completed by a `COMPLETE` marker, then
renamed into place in one `os.replace`; only after that are older checkpoints removed. A folder without the marker
or with the temporary prefix is never resumed from, so a run killed at any instant resumes from its last complete
checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from yoloscale.errors import UserError

MARKER = "COMPLETE"
KEEP = "KEEP"  # a checkpoint that save_period keeps: never removed by the rotation


@dataclass
class TrainerState:
    """The trainer's own counters: everything besides tensors that a resumed run needs."""

    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed by each rank (the data position)
    micro_step: int = 0  # micro-batches consumed since the start of training (Ultralytics' `ni`)
    optimizer_steps: int = 0
    last_opt_step: int = -1  # micro_step of the last optimizer step (Ultralytics' last_opt_step)
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm
    ema_updates: int = 0
    best_fitness: float = -1.0
    best_epoch: int = 0  # epochs completed when the best fitness was reached (early stopping's reference)
    early_stopped: bool = False
    world_size: int = 1
    batch: int = 0  # per-device batch
    backend: str = "ddp"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Atomically write a state dict as safetensors (tmp file + rename)."""
    tmp = path.with_name(f".tmp-{path.name}")
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp))
    os.replace(tmp, path)


def save_checkpoint(accelerator, run_dir: Path, state: TrainerState, ema_state: dict | None, keep: int = 1,
                    keep_this: bool = False) -> Path:  # fmt: skip
    """Collective: every rank must call it. Returns the final checkpoint folder. The newest `keep` checkpoints stay,
    and those saved with `keep_this` (save_period)."""
    root = run_dir / "checkpoints"
    final = root / f"step-{state.optimizer_steps:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a run killed while saving
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # model, optimizer, scaler, per-rank RNG states
    if accelerator.is_main_process:
        if ema_state is not None:
            save_weights(ema_state, tmp / "ema.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
        if keep_this:
            (tmp / KEEP).touch()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / MARKER, "w") as f:
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # same step saved twice (e.g. periodic save right before an epoch end)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(run_dir)[:-keep]:
            if not (old / KEEP).exists():
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MARKER).is_file())


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or the latest complete one of a run directory; a clear error when there is none."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    if path.name.startswith(".tmp-") or (path.parent.name == "checkpoints" and path.is_dir()):
        raise UserError(f"checkpoint '{path}' is incomplete (no {MARKER} marker): the save was interrupted.")
    if not path.is_dir():
        raise UserError(f"resume: '{path}' does not exist.")
    found = complete_checkpoints(path)
    if not found:
        raise UserError(f"resume: run directory '{path}' holds no complete checkpoint under checkpoints/.")
    return found[-1]


def load_checkpoint(accelerator, ckpt: Path, model, optimizer, backend, group_names: list[list[str]],
                    check=None) -> tuple[TrainerState, dict | None]:  # fmt: skip
    """Restore model, optimizer and RNG states in place (from any backend and world size: Backend.load_state);
    return our counters and the EMA state dict (if saved).

    `check(state)` runs before anything is loaded, so a checkpoint this run cannot take (e.g. saved mid-epoch with
    another global batch) is refused with its own message instead of failing inside the loader."""
    try:
        saved = json.loads((ckpt / "trainer_state.json").read_text())
        state = TrainerState(**{k: v for k, v in saved.items() if k in TrainerState.__dataclass_fields__})
    except Exception as e:
        raise UserError(f"checkpoint '{ckpt}' is corrupt or unreadable: {type(e).__name__}: {e}") from None
    if check is not None:
        check(state)
    try:
        from yoloscale.backend import layout_of

        backend.load_state(accelerator, ckpt, layout_of(state.backend), state.world_size, model, optimizer,
                           group_names)  # fmt: skip
        ema_file = ckpt / "ema.safetensors"
        ema_state = load_file(str(ema_file)) if ema_file.is_file() else None
    except Exception as e:
        raise UserError(f"checkpoint '{ckpt}' is corrupt or unreadable: {type(e).__name__}: {e}") from None
    return state, ema_state
