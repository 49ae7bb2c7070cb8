"""Model: an Ultralytics DetectionModel from a detection YAML or from a local Ultralytics .pt (its architecture and
weights, as `yolo train model=yolo11x.pt` fine-tunes), with `nc` from the data; and initial weights from a file."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import torchvision.ops
import ultralytics.nn.tasks as tasks
from ultralytics.nn.tasks import DetectionModel, yaml_model_load

from yoloscale.compat import torch_safe_load
from yoloscale.config import frozen_prefixes
from yoloscale.errors import UserError, warn


def model_spec(model: str, trust_pickle: bool = False) -> str | dict:
    """What DetectionModel is built from: the YAML name/path, or the architecture dict stored in a .pt."""
    if str(model).endswith(".pt"):
        return read_ultralytics_pt(model, trust_pickle)[0]
    if not str(model).endswith((".yaml", ".yml")):
        raise UserError(f"model '{model}' must be a model YAML (e.g. yolo11n.yaml) or a local Ultralytics .pt.")
    return model


def build_model(
    spec: str | dict,
    nc: int,
    names: dict[int, str],
    args: SimpleNamespace,
    verbose: bool = False,
    trust_pickle: bool = False,
    head_nc: int = 0,
):
    """A DetectionModel from a YAML name/path or an architecture dict; `args` (Ultralytics' namespace) carries the
    loss gains the criterion reads. `head_nc`: the class count of the weights a run fine-tuned from, when their
    wider class branches were kept (pretrained.py): a resume or an export rebuilds the same shapes. The architecture is checked first (`check_architecture`): Ultralytics evaluates
    parts of it as Python, so anything but layer names and literals is refused unless `trust_pickle=True`."""

    what = spec if isinstance(spec, str) else f"the architecture in {spec.get('yaml_file', 'the .pt')}"
    try:
        cfg = yaml_model_load(spec) if isinstance(spec, str) else dict(spec)  # bundled names -> their scale
    except FileNotFoundError:
        raise UserError(f"model YAML '{spec}' not found (neither a file nor an Ultralytics model name).") from None
    except Exception as e:
        raise UserError(f"model {what!r} could not be read: {e}") from None
    if not trust_pickle:
        check_architecture(cfg, what)
    try:
        model = DetectionModel(cfg, nc=nc, verbose=verbose)
    except Exception as e:
        raise UserError(f"model {what!r} could not be built: {e}") from None
    if not hasattr(model.model[-1], "stride") or not hasattr(model, "stride"):
        raise UserError(f"model {what!r} is not a detection model.")
    model.names = names
    model.args = args
    if head_nc and head_nc != nc:
        widen_class_branches(model, head_nc)
    return model


def check_architecture(arch: dict, what: str) -> None:
    """Refuse an architecture that would make Ultralytics run code while building it: its `activation` is evaluated
    as Python and each layer's module name is looked up among the globals of its model module (functions included).
    Allowed, as Ultralytics' own restricted loading allows: an activation `[torch.]nn.<Module>(<literals>)`, and
    layer modules that are torch.nn / torchvision.ops / Ultralytics module classes."""

    why = "it would run code while the model is built; pass trust_pickle=True only if you trust its source"
    act = arch.get("activation")
    if act is not None and not _plain_activation(act):
        raise UserError(
            f"model {what}: activation {str(act)[:80]!r} is not a torch.nn module with literal arguments ({why})."
        )
    layers = arch.get("backbone", []) + arch.get("head", [])
    if not isinstance(layers, list):
        raise UserError(f"model {what}: 'backbone' and 'head' must be lists of layers.")
    for i, layer in enumerate(layers):
        name = layer[2] if isinstance(layer, (list, tuple)) and len(layer) == 4 else None
        if not isinstance(name, str) or not _is_module_class(name, nn.Module):
            raise UserError(f"model {what}: layer {i}'s module {str(name)[:80]!r} is not a model layer class ({why}).")


def _plain_activation(act: Any) -> bool:
    """`nn.SiLU()`, `torch.nn.LeakyReLU(0.1)`: a torch.nn Module class called with literal arguments only."""

    try:
        call = ast.parse(str(act).strip(), mode="eval").body
        node, path = call.func if isinstance(call, ast.Call) else None, []
        while isinstance(node, ast.Attribute):
            path.insert(0, node.attr)
            node = node.value
        if not isinstance(node, ast.Name) or [node.id, *path[:-1]] not in (["nn"], ["torch", "nn"]):
            return False
        klass = getattr(nn, path[-1], None)
        for arg in [*call.args, *(k.value for k in call.keywords)]:
            ast.literal_eval(arg)
    except (SyntaxError, ValueError, TypeError, IndexError):
        return False
    return isinstance(klass, type) and issubclass(klass, nn.Module) and all(k.arg for k in call.keywords)


def _is_module_class(name: str, base: type) -> bool:
    """Whether Ultralytics' parse_model would resolve `name` to a Module class (its lookup, without calling it)."""

    if name.startswith("nn."):
        found = getattr(nn, name[3:], None)
    elif name.startswith("torchvision.ops."):
        found = getattr(torchvision.ops, name[16:], None)
    else:
        found = vars(tasks).get(name)
    return isinstance(found, type) and issubclass(found, base)


def read_ultralytics_pt(path: str | Path, trust_pickle: bool = False) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(architecture dict, fp32 state dict, class names) of a local Ultralytics checkpoint (read_ultralytics_model)."""
    model = read_ultralytics_model(path, trust_pickle)
    names = getattr(model, "names", None)
    return (
        dict(model.yaml),
        {k: v.float() for k, v in model.state_dict().items()},
        names if isinstance(names, dict) else {},
    )


def read_ultralytics_model(path: str | Path, trust_pickle: bool = False) -> torch.nn.Module:
    """The model (its EMA if it has one) of a local Ultralytics checkpoint. `.pt` files are pickles: read with
    `torch.load(weights_only=True)` and Ultralytics' allow-list of its own model classes (its `safe_only` load);
    a file that needs anything else is refused unless `trust_pickle=True`, which runs the full pickle."""

    safe_load = torch_safe_load()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' not found (nothing is downloaded: give a local .pt, or a model YAML).")
    try:
        ckpt, _ = safe_load(str(path), safe_only=True)
    except Exception as e:
        if not trust_pickle:
            raise UserError(
                f"'{path}' is not a plain Ultralytics checkpoint (a weights-only load refused it: "
                f"{_first_line(e)}); if you trust its source, pass trust_pickle=True."
            ) from None
        warn(f"loading '{path}' as a full pickle (trust_pickle=True): it can run code")
        try:
            ckpt, _ = safe_load(str(path), safe_only=False)
        except Exception as e2:
            raise UserError(f"'{path}' could not be read as an Ultralytics checkpoint: {_first_line(e2)}") from None
    model = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, torch.nn.Module) or not isinstance(getattr(model, "yaml", None), dict):
        raise UserError(f"'{path}' holds no Ultralytics model (expected 'ema' or 'model' with its YAML).")
    return model


def _first_line(e: Exception) -> str:
    return " ".join(str(e).split("\n")[0].replace("❌", "").split())[:300]


def freeze_layers(model: torch.nn.Module, freeze: str) -> int:
    """requires_grad off for what freeze= names, and for DFL as in Ultralytics; returns how many parameters are
    frozen. Freezing every parameter is an error."""

    prefixes = frozen_prefixes(freeze)
    frozen = 0
    for name, param in model.named_parameters():
        if any(name.startswith(p) for p in prefixes) or ".dfl" in name:
            param.requires_grad_(False)
            frozen += 1
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"freeze={freeze} freezes every parameter of the model: nothing would train.")
    return frozen


def model_with_classes(model: torch.nn.Module, nc: int) -> torch.nn.Module:
    """The same architecture with `nc` classes (fresh weights)."""

    return DetectionModel(model.yaml, nc=nc, verbose=False)


def widen_class_branches(model: torch.nn.Module, source_nc: int) -> None:
    """The class-branch widths of a model fine-tuned from weights of `source_nc` classes (its weights come after:
    a resume's checkpoint, an export's safetensors)."""
    names = model.names
    model.names = {i: str(i) for i in range(model.model[-1].nc)}
    model.load(model_with_classes(model, source_nc), verbose=False)
    model.names = names
