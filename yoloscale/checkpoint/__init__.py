"""Resumable checkpoints: the trainer's stateful pieces and the backend's state, in a folder that is safe at every
instant and verified when read (folder.py says how).

    RUN/checkpoints/step-NNNNNNNN[-end]/
        Accelerate's state: the model, optimizer, loss scaler, every rank's RNG states, in the backend's layout
        trainer_state.json   every piece's state_dict (state.py: progress, step health, epoch losses; the EMA's count)
        ema.safetensors      the EMA's tensors ("tensors" of its state_dict)
        MANIFEST.json        size and hash of every file;  COMPLETE  the marker, written last

`-end` marks the save at an epoch's end, so a periodic save on the epoch's last step and the epoch-end save of the
same step are two folders. The newest `keep_checkpoints` are kept; resume takes the newest that verifies and falls
back to an older one with a warning naming the damaged one.
"""

from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from yoloscale.checkpoint import folder
from yoloscale.checkpoint.background import BackgroundWriter
from yoloscale.checkpoint.folder import KEEP, MARKER
from yoloscale.checkpoint.trusted import check_folder
from yoloscale.distributed.collective import any_rank
from yoloscale.errors import UserError, warn

STATE = "trainer_state.json"
__all__ = [
    "KEEP",
    "MARKER",
    "complete_checkpoints",
    "find_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "save_weights",
    "wait_for_writer",
]


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Atomically write a state dict as safetensors (tmp file + rename)."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp))
        os.replace(tmp, path)
    except Exception as e:  # torch raises RuntimeError, safetensors SafetensorError on a full disk
        tmp.unlink(missing_ok=True)
        error = folder.io_error(e, path, 4 * sum(v.numel() for v in state_dict.values()), what="a weights file")
        if error is None:
            raise
        raise error from None


def _split(pieces: dict[str, Any]) -> tuple[dict, dict[str, dict]]:
    """Every piece's state_dict: the JSON part, and the tensors (a piece's 'tensors' entry) by piece."""
    state, tensors = {}, {}
    for name, piece in pieces.items():
        sd = dict(piece.state_dict())
        if "tensors" in sd:
            tensors[name] = sd.pop("tensors")
        state[name] = sd
    return state, tensors


def save_checkpoint(
    accelerator,
    run_dir: Path,
    step: int,
    pieces: dict[str, Any],
    epoch_end: bool = False,
    keep: int = 2,
    keep_this: bool = False,
    writer: BackgroundWriter | None = None,
) -> Path:
    """Collective: every rank must call it. `pieces`: name -> object with state_dict(). Returns the folder.
    Every rank writes its files here; the main rank then seals, switches and rotates: with a `writer`, as a job of
    that background thread, after the jobs queued before it (the folder is complete once `wait_for_writer`
    returned), else before returning. The caller waits for an earlier save of the same step before saving it again
    (the trainer waits for every earlier save: at most one is in flight)."""
    root = Path(run_dir) / "checkpoints"
    name = f"step-{step:08d}" + ("-end" if epoch_end else "")
    final, tmp = root / name, root / f".tmp-{name}"
    state, tensors = _split(pieces)  # collective (the EMA gathers), before anything is written
    error = None
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a save killed before its marker
            tmp.mkdir()
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # model, optimizer, scaler, per-rank RNG states
        if accelerator.is_main_process:
            for piece, t in tensors.items():
                save_file({k: v.detach().contiguous().cpu() for k, v in t.items()}, str(tmp / f"{piece}.safetensors"))
            (tmp / STATE).write_text(json.dumps(state, indent=1))
            if keep_this:
                (tmp / KEEP).touch()
    except Exception as e:  # torch raises RuntimeError, safetensors SafetensorError on a full disk
        newest = _newest(root)
        error = folder.io_error(e, tmp, folder.size_of(newest), previous=newest)
        if error is None:
            raise
    if any_rank(accelerator, error is not None):  # every rank stops together, the main one says why
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise error or UserError(f"another process could not write its part of checkpoint '{final}'.")
    folder.fault("written")
    if accelerator.is_main_process:
        seal = partial(_seal_and_switch, tmp, final, keep)
        writer.submit(seal) if writer is not None else seal()
    if writer is None:
        accelerator.wait_for_everyone()
    return final


def wait_for_writer(accelerator, writer: BackgroundWriter) -> None:
    """Collective: return when the main rank's background jobs have run. An error in one (a full disk) is raised on
    every rank, the main one with its own message."""
    error: Exception | None = None
    if accelerator.is_main_process:
        try:
            writer.wait()
        except Exception as e:
            error = e
    if any_rank(accelerator, error is not None):
        raise error or UserError("the main process could not finish writing a checkpoint or weights (see its error).")


def _seal_and_switch(tmp: Path, final: Path, keep: int) -> None:
    """The main rank's part, after every rank wrote its files: the manifest and marker, the rename, the rotation."""
    try:
        folder.seal(tmp)
    except OSError as e:
        newest = _newest(final.parent)
        error = folder.io_error(e, tmp, folder.size_of(newest), previous=newest)
        if error is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise error from None
    folder.switch(tmp, final)
    folder.rotate(final.parent, keep)


def _newest(root: Path) -> Path | None:
    done = folder.complete(root)
    return done[-1] if done else None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (not yet verified)."""
    return folder.complete(Path(run_dir) / "checkpoints")


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder that verifies: the one named, or the newest of a run directory that does, with a warning
    for each newer one that does not. A clear error when there is none."""
    path = Path(path)
    if (path / MARKER).is_file():
        problem = folder.verify(path)
        if problem:
            raise UserError(
                f"checkpoint '{path}' is damaged: {problem}. Resume the run directory instead to fall "
                "back to an older checkpoint."
            )
        return path
    if not path.exists():
        raise UserError(f"resume: '{path}' does not exist.")
    if folder.step_name(path) or (path.parent.name == "checkpoints" and path.is_dir()):
        raise UserError(f"checkpoint '{path}' is incomplete (no {MARKER} marker): the save was interrupted.")
    if not path.is_dir():
        raise UserError(f"resume: '{path}' is not a run directory or a checkpoint folder.")
    found = complete_checkpoints(path)
    if not found:
        raise UserError(f"resume: run directory '{path}' holds no complete checkpoint under checkpoints/.")
    for ckpt in reversed(found):
        problem = folder.verify(ckpt)
        if problem is None:
            return ckpt
        warn(f"checkpoint '{ckpt}' is damaged ({problem}); trying an older one")
    raise UserError(f"resume: every checkpoint of '{path}' is damaged (the newest: {folder.verify(found[-1])}).")


def read_state(ckpt: Path) -> dict:
    """trainer_state.json (an older flat file is read as the progress piece)."""
    try:
        saved = json.loads((ckpt / STATE).read_text())
    except Exception as e:
        raise UserError(f"checkpoint '{ckpt}' is corrupt or unreadable: {type(e).__name__}: {e}") from None
    if "progress" not in saved:  # written before the pieces had their own entries
        saved = {
            "progress": {**saved, "device_batch": saved.get("batch", 0)},
            "health": {"skipped": saved.get("skipped_steps", 0)},
            "ema": {"updates": saved.get("ema_updates", 0)},
        }
    return saved


def load_checkpoint(
    accelerator,
    ckpt: Path,
    model,
    optimizer,
    backend,
    group_names: list[list[str]],
    pieces: dict[str, Any],
    check=None,
    trust_pickle: bool = False,
) -> None:
    """Restore the backend's state (from any backend and world size: Backend.load_state) and every piece in place.
    `check(progress_state)` runs before anything is loaded, so a checkpoint this run cannot take (e.g. saved
    mid-epoch with another per-device batch) is refused with its own message instead of failing inside the loader.
    No file is handed to a loader before every pickle in the folder was found harmless (trusted.py)."""

    check_folder(ckpt, trust_pickle)
    saved = read_state(ckpt)
    progress = saved["progress"]
    if check is not None:
        check(progress)
    try:
        backend.load_state(
            accelerator,
            ckpt,
            progress.get("backend", "ddp"),
            progress.get("world_size", 1),
            model,
            optimizer,
            group_names,
        )
        for name, piece in pieces.items():
            state = dict(saved.get(name, {}))
            tensors = ckpt / f"{name}.safetensors"
            if tensors.is_file():
                state["tensors"] = load_file(str(tensors))
            elif name == "ema":
                raise UserError(f"checkpoint '{ckpt}' has no ema.safetensors, and this run keeps an EMA.")
            piece.load_state_dict(state)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"checkpoint '{ckpt}' is corrupt or unreadable: {type(e).__name__}: {e}") from None
