"""`yoloscale export RUN [format=...]`: a run's weights as Ultralytics .pt files, from its latest checkpoint and its
best weights, without the training data or GPUs; with format=, through Ultralytics' own exporter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file
from ultralytics import YOLO
from ultralytics.engine.exporter import export_formats

from yoloscale.backend import layout_of
from yoloscale.backend.full_state import read_weights
from yoloscale.checkpoint import complete_checkpoints, find_checkpoint, read_state, save_weights
from yoloscale.checkpoint.trusted import check_folder
from yoloscale.config import load_config, parse_command, setting
from yoloscale.errors import UserError
from yoloscale.training.data import ultralytics_args
from yoloscale.training.distill import strip_projector
from yoloscale.training.export import write_ultralytics_pt
from yoloscale.training.model import build_model
from yoloscale.training.run_dir import read_run_info


def pt_from_weights(
    src: Path | dict,
    dst: Path,
    model_yaml: str | dict,
    names: dict,
    args: SimpleNamespace,
    trust_pickle: bool = False,
    head_nc: int = 0,
) -> Path:
    """Rebuild the model from its YAML (`head_nc`: run_info's, for a run fine-tuned from other classes), load
    weights (a safetensors file or a state dict), write an Ultralytics .pt."""
    names = {int(k): v for k, v in names.items()}
    model = build_model(model_yaml, len(names), names, args, trust_pickle=trust_pickle, head_nc=head_nc)
    try:
        model.load_state_dict(src if isinstance(src, dict) else load_file(str(src)))
    except Exception as e:
        what = f"the weights for '{dst}'" if isinstance(src, dict) else f"'{src}'"
        raise UserError(f"{what} do not match this run's model: {e}") from None
    return write_ultralytics_pt(model.eval(), args, dst)


def checkpoint_weights(ckpt: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint's EMA, or (a run with ema=False) its model weights in whichever layout its backend wrote:
    DDP's safetensors, FSDP2's DCP shards or DeepSpeed's ZeRO partitions, consolidated on this machine. Pickles
    are read only once found harmless (checkpoint/trusted.py). A distilled run's projectors are left out."""

    if (ckpt / "ema.safetensors").is_file():
        return strip_projector(load_file(str(ckpt / "ema.safetensors")))
    check_folder(ckpt, trust_pickle)
    try:
        backend = read_state(ckpt)["progress"].get("backend", "ddp")
        return strip_projector({k: v.contiguous() for k, v in read_weights(ckpt, layout_of(backend)).items()})
    except Exception as e:
        raise UserError(f"checkpoint '{ckpt}' is corrupt or unreadable: {type(e).__name__}: {e}") from None


def export_run(run: Path, trust_pickle: bool = False) -> list[Path]:
    """`yoloscale export RUN`: write weights/last.pt from the latest checkpoint (its EMA, or with ema=False its model
    weights, whatever the backend; else weights/last.safetensors) and weights/best.pt from weights/best.safetensors,
    without needing the training data or GPUs. A run killed before its end gets weights/last.safetensors too."""
    run = Path(run)
    info = read_run_info(run)
    cfg = load_config(run / "config.yaml")
    args = ultralytics_args(cfg, info["data"])
    weights = run / "weights"
    weights.mkdir(exist_ok=True)
    sources: dict = {"best": weights / "best.safetensors", "last": weights / "last.safetensors"}
    if complete_checkpoints(run):
        sources["last"] = checkpoint_weights(find_checkpoint(run), trust_pickle)  # the newest that verifies
        if not (weights / "last.safetensors").exists():
            save_weights(sources["last"], weights / "last.safetensors")
    written = [
        pt_from_weights(
            src, weights / f"{kind}.pt", info["model"], info["names"], args, trust_pickle, info.get("head_nc", 0)
        )
        for kind, src in sources.items()
        if isinstance(src, dict) or src.is_file()
    ]
    if not written:
        raise UserError(f"'{run}' has no weights to export (no checkpoint and no weights/*.safetensors).")
    return written


@dataclass
class ExportSettings:
    run: str = setting("", "The run directory (required; may also be given first, without run=).")
    trust_pickle: bool = setting(
        False,
        "Read the run's checkpoint pickles and model architecture even where they could run code (trusted runs only).",
    )
    # Ultralytics' export keys: with format=, best.pt (else last.pt) goes through Ultralytics' own exporter
    format: str = setting(
        "", "Also export best.pt to this format with Ultralytics' exporter: onnx, torchscript, engine, openvino, ..."
    )
    imgsz: int = setting(0, "Export image size (0: the run's).")
    half: bool = setting(False, "FP16 export (formats that support it).")
    int8: bool = setting(False, "INT8 quantisation (formats that support it).")
    dynamic: bool = setting(False, "Dynamic input sizes (ONNX, TensorRT, ...).")
    simplify: bool = setting(True, "Simplify the ONNX graph.")
    opset: int = setting(0, "ONNX opset (0: the exporter's default).")
    batch: int = setting(1, "Export batch size.")
    nms: bool = setting(False, "Add NMS to the exported model (formats that support it).")
    device: str = setting("", "Device to export on, e.g. cpu or 0 (empty: the exporter's choice).")


EXPORT_KEYS = ("half", "int8", "dynamic", "simplify", "batch", "nms")


def export_format(pt: Path, ns: ExportSettings, run_imgsz: int) -> Path:
    """`pt` through Ultralytics' exporter (YOLO(pt).export(format=...)); returns what it wrote."""

    formats = list(export_formats()["Argument"])
    if ns.format not in formats:
        raise UserError(f"export: format={ns.format!r} is not one of Ultralytics' formats ({', '.join(formats[1:])}).")
    options = {k: getattr(ns, k) for k in EXPORT_KEYS}
    options.update(imgsz=ns.imgsz or run_imgsz, **({"opset": ns.opset} if ns.opset else {}))
    options.update({"device": ns.device} if ns.device else {})
    try:
        return Path(YOLO(str(pt)).export(format=ns.format, **options))
    except Exception as e:  # a missing package (installs are off), a format this machine cannot build...
        text = " ".join(str(e).split())
        raise UserError(f"export: Ultralytics' exporter could not write {ns.format} from '{pt}': {text}") from None


def run(args: list[str]) -> list[Path]:
    """Entry point of `yoloscale export [RUN] [run=RUN]`."""
    if args and "=" not in args[0]:
        args = [f"run={args[0]}", *args[1:]]
    ns, _, _ = parse_command(ExportSettings, args, "export", train_keys=False)
    if not ns.run:
        raise UserError("export: give the run directory (yoloscale export RUN).")
    written = export_run(Path(ns.run), ns.trust_pickle)
    if ns.format:
        pt = next((p for p in written if p.name == "best.pt"), written[0])
        written.append(export_format(pt, ns, int(read_run_info(Path(ns.run)).get("imgsz", 640))))
    for path in written:
        print(f"wrote {path}")
    return written
