"""Model: an Ultralytics DetectionModel from any detection YAML, with `nc` from the data and optional local weights."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from yoloscale.errors import UserError


def build_model(model_yaml: str, nc: int, names: dict[int, str], args: SimpleNamespace, verbose: bool = False):
    """Build a DetectionModel; `args` (Ultralytics' namespace) carries the loss gains the criterion reads."""
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    if not str(model_yaml).endswith((".yaml", ".yml")):
        raise UserError(f"model '{model_yaml}' must be a model YAML (e.g. yolo11n.yaml); start from a .pt with weights=.")
    try:
        cfg = yaml_model_load(model_yaml)  # resolves bundled names like 'yolo11x.yaml' to their scale
        model = DetectionModel(cfg, nc=nc, verbose=verbose)
    except FileNotFoundError:
        raise UserError(f"model YAML '{model_yaml}' not found (neither a file nor an Ultralytics model name).") from None
    except Exception as e:
        raise UserError(f"model YAML '{model_yaml}' could not be built: {e}") from None
    if not hasattr(model.model[-1], "stride") or not hasattr(model, "stride"):
        raise UserError(f"model YAML '{model_yaml}' is not a detection model.")
    model.names = names
    model.args = args
    return model


def load_weights(model: torch.nn.Module, path: str | Path) -> int:
    """Copy matching tensors from a local file into `model`; returns how many were copied.

    `.safetensors` is read with safetensors. Ultralytics `.pt` files are pickles: they are loaded with Ultralytics'
    own loader and must come from a trusted source. Nothing is ever downloaded.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file '{path}' not found.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:
            raise UserError(f"weights file '{path}' is not a readable safetensors file: {e}") from None
    elif path.suffix == ".pt":
        from ultralytics.nn.tasks import load_checkpoint

        try:
            weights, _ = load_checkpoint(str(path))
        except Exception as e:
            raise UserError(f"weights file '{path}' could not be loaded as an Ultralytics checkpoint: {e}") from None
        state = weights.float().state_dict()
    else:
        raise UserError(f"weights file '{path}' must be .safetensors or an Ultralytics .pt.")
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    return len(matched)
