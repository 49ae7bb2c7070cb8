"""A fresh run's initial weights, as Ultralytics fine-tunes: from model=*.pt, weights= or pretrained=PATH.

The tensors go in through Ultralytics' own `DetectionModel.load`, so a model pretrained on other classes transfers
as in Ultralytics: the hidden layers of the class branches keep the pretrained width (their width follows the class
count), and with cls_remap the classification rows of classes present in both are copied by class name. Before it,
our checks turn another architecture into one line naming the tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from yoloscale.errors import UserError
from yoloscale.training.model import model_with_classes, read_ultralytics_pt

PICKLE_NOTE = "a pickle, read weights-only: Ultralytics' allow-list"


def initial_weights(
    model: torch.nn.Module,
    model_name: str,
    weights: str,
    trust_pickle: bool,
    pretrained: str = "True",
    cls_remap: bool = True,
) -> tuple[str, int]:
    """Those of `weights=` or `pretrained=PATH`, else those of `model=*.pt` unless pretrained=False (Ultralytics: its
    architecture only). Returns (the report line, '' for none; the class count whose branch width the model took,
    0 if it kept its own)."""
    weights = weights or ("" if pretrained in ("True", "False") else pretrained)
    if model_name.endswith(".pt") and not weights and pretrained != "False":
        _, state, names = read_ultralytics_pt(model_name, trust_pickle)
        return load_into(model, state, f"{model_name} ({PICKLE_NOTE})", names, cls_remap)
    if not weights:
        return "", 0
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"weights file '{path}' not found.")
    if path.suffix == ".pt":
        _, state, names = read_ultralytics_pt(path, trust_pickle)
        return load_into(model, state, f"{path} ({PICKLE_NOTE})", names, cls_remap)
    if path.suffix != ".safetensors":
        raise UserError(f"weights file '{path}' must be .safetensors or an Ultralytics .pt.")

    try:
        state = load_file(str(path))
    except Exception as e:
        raise UserError(f"weights file '{path}' is not a readable safetensors file: {e}") from None
    return load_into(model, state, str(path), {}, cls_remap)


def _outputs_key(model: torch.nn.Module) -> str:
    """The state key of the first class branch's output convolution (its rows are the classes)."""
    head = model.model[-1]
    return f"model.{len(model.model) - 1}.cv3.0.{len(head.cv3[0]) - 1}.weight"


def _class_width(model: torch.nn.Module) -> int:
    return model.model[-1].cv3[0][-1].in_channels


def load_into(
    model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, names: dict, cls_remap: bool
) -> tuple[str, int]:
    """Ultralytics' fine-tuning load of `state` (a model of this architecture, any class count) into `model`."""
    key = _outputs_key(model)
    source_nc = state[key].shape[0] if key in state and state[key].ndim == 4 else model.model[-1].nc
    # the file's tensors go on a model of its class count, which Ultralytics' load then reads from
    donor = model_with_classes(model, source_nc)
    own = donor.state_dict()
    matched = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    wrong = [k for k, v in state.items() if k in own and k not in matched]
    if not matched:
        raise UserError(
            f"weights '{source}': none of its {len(state)} tensors matches this model by name and "
            "shape (another architecture?)."
        )
    if wrong:
        k = wrong[0]
        raise UserError(
            f"weights '{source}': tensor '{k}' has shape {tuple(state[k].shape)}, the model "
            f"{tuple(own[k].shape)} ({len(wrong)} such): another architecture or scale."
        )
    donor.load_state_dict({k: state[k] for k in matched}, strict=False)
    placeholders = {i: str(i) for i in range(source_nc)}
    donor.names = names if cls_remap and len(names) == source_nc else placeholders
    own_names, width = model.names, _class_width(model)
    if not cls_remap:
        model.names = {i: str(i) for i in range(model.model[-1].nc)}  # Ultralytics remaps only between real names
    model.load(donor, verbose=False)  # widens the class branches, remaps class rows by name, copies the rest
    model.names = own_names
    return _report(model, state, matched, source, source_nc), (source_nc if _class_width(model) != width else 0)


def _report(model, state: dict, matched: list[str], source: str, source_nc: int) -> str:
    after = model.state_dict()
    loaded = sum(1 for k in matched if k in after and after[k].shape == state[k].shape)
    report = f"weights '{source}': {loaded} of {len(after)} tensors loaded"
    if source_nc != model.model[-1].nc:
        report += (
            f"; the file has {source_nc} classes, the data {model.model[-1].nc}: the class outputs start anew, but for the "
            "rows of classes of the same name (cls_remap)"
        )
    missing = sum(1 for k in after if k not in state)
    return report + (f"; {missing} not in the file" if missing else "")
