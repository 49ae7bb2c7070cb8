"""Nothing in a checkpoint folder runs code when it is read.

Resume and `yoloscale export` hand a checkpoint's files to loaders that unpickle them in full: DeepSpeed reads its
`*_states.pt` with `torch.load(weights_only=False)` and torch.distributed.checkpoint reads a DCP folder's `.metadata`
with `pickle.load`. A pickle can call any function it names, so before any of that, every pickle in the folder is
read once with a loader that only builds what these layouts hold (tensors, containers, numbers, and the few classes
named below): torch's weights-only unpickler for torch.save files, a restricted unpickler for plain pickles. A file
that names anything else is refused with one line, unless the user passes trust_pickle=True.
"""

from __future__ import annotations

import functools
import importlib
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from yoloscale.compat import accelerate_safe_globals
from yoloscale.errors import UserError

# Plain pickles: DCP's `.metadata` (its dataclasses, a PosixPath, torch's Size, dtypes and layouts).
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_PLAIN = {
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
}
# torch.save files of DeepSpeed (its optimizer states) and Accelerate (numpy RNG states), beyond torch's own list.
_DEEPSPEED = (
    "deepspeed.utils.tensor_fragment:fragment_address",
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.runtime.zero.config:ZeroStageEnum",
)
DEEPSPEED_FOLDER = "pytorch_model"  # where Accelerate's DeepSpeed layout keeps DeepSpeed's own files
_SKIP = (".safetensors", ".json", ".distcp", ".py", ".txt", ".yaml")


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = getattr(importlib.import_module(module), name, None) if module in _DCP_MODULES else None
        allowed = (
            (module, name) in _PLAIN
            or isinstance(found, type)  # DCP's dataclasses and enums
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"it names {module}.{name}")
        return super().find_class(module, name)


@functools.cache
def safe_globals(deepspeed: bool = False) -> tuple:
    """What torch's weights-only loader may build from our checkpoints besides its defaults: Accelerate's numpy
    list (the RNG states), and for files of a DeepSpeed layout its few classes (importing DeepSpeed takes seconds,
    so only then)."""

    allowed = [*accelerate_safe_globals(), np.dtype]
    if deepspeed:
        try:
            for entry in _DEEPSPEED:
                module, _, name = entry.partition(":")
                allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass  # without DeepSpeed there is nothing of DeepSpeed's to read
    return tuple(allowed)


def load_weights_only(path: Path, map_location="cpu", deepspeed: bool = False):
    """torch.load of a file of ours (or Accelerate's, or with `deepspeed` DeepSpeed's), weights only."""
    with torch.serialization.safe_globals(list(safe_globals(deepspeed))):
        return torch.load(path, map_location=map_location, weights_only=True)


def problem_with(path: Path) -> str | None:
    """None if reading `path` cannot run code, else why (one phrase)."""
    deepspeed = DEEPSPEED_FOLDER in path.parts
    if zipfile.is_zipfile(path):  # torch.save's format: torch's weights-only unpickler, tensors mapped, not read
        try:
            with torch.serialization.safe_globals(list(safe_globals(deepspeed))):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            named = _unsafe_globals(path, deepspeed)
            return f"it names {', '.join(named[:3])}" if named else f"{type(e).__name__}: {_first_line(e)}"
        return None
    with open(path, "rb") as f:
        if f.read(1) != b"\x80":  # not a pickle (a pickle of protocol 2+ starts with PROTO)
            return None
        f.seek(0)
        try:
            _Restricted(f).load()  # DCP's .metadata, or torch.save's legacy format
        except Exception as e:
            return _first_line(e)
    return None


def _unsafe_globals(path: Path, deepspeed: bool) -> list[str]:
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in safe_globals(deepspeed) if hasattr(g, "__qualname__")}
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:
        return []


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:160]


def check_folder(folder: Path, trust_pickle: bool = False) -> None:
    """Refuse a checkpoint folder holding a pickle that would run code when read (every file but those that cannot:
    safetensors, JSON, DCP's tensor data, text)."""
    if trust_pickle:
        return
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        if path.name.endswith(_SKIP) or path.name in ("latest", "COMPLETE", "KEEP"):
            continue
        problem = problem_with(path)
        if problem:
            raise UserError(
                f"checkpoint file '{path}' is refused: reading it could run code ({problem}). If you trust where "
                "this run folder came from, pass trust_pickle=True."
            )
