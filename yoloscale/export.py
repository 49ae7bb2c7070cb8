"""Turn EMA weights into files Ultralytics opens: `best.pt` / `last.pt` for `YOLO(path).val() / .predict() /
.export()`, next to the safetensors they come from.

An Ultralytics checkpoint is a pickle of the model object plus `train_args`; we write the EMA model in fp16 with
`epoch=-1` (a finished run, so Ultralytics never tries to resume it), as its own trainer does at the end.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from yoloscale.config import setting
from yoloscale.errors import UserError


def ultralytics_checkpoint(model: torch.nn.Module, args: SimpleNamespace, metrics: dict | None = None) -> dict:
    from ultralytics import __version__

    model = deepcopy(model).half().to(memory_format=torch.contiguous_format)
    model.criterion = None  # training-only state
    for p in model.parameters():
        p.requires_grad_(False)
    return {
        "epoch": -1,
        "best_fitness": (metrics or {}).get("fitness"),
        "model": None,
        "ema": model,
        "updates": None,
        "optimizer": None,
        "train_args": dict(vars(args)),
        "train_metrics": metrics or {},
        "date": datetime.now().astimezone().isoformat(),
        "version": __version__,
        "license": "AGPL-3.0 (https://ultralytics.com/license)",
    }


def write_ultralytics_pt(
    model: torch.nn.Module, args: SimpleNamespace, path: Path, metrics: dict | None = None
) -> Path:
    from yoloscale.checkpoint.folder import io_error

    tmp = path.with_name(f".tmp-{path.name}")
    try:
        torch.save(ultralytics_checkpoint(model, args, metrics), tmp)
        tmp.replace(path)
    except Exception as e:  # torch raises RuntimeError on a full disk
        tmp.unlink(missing_ok=True)
        error = io_error(e, path, 2 * sum(p.numel() for p in model.parameters()), what="an Ultralytics .pt")
        if error is None:
            raise
        raise error from None
    return path


class RunWeights:
    """The run directory's weights/ folder, written by the main rank: last.pt after every epoch, best.pt and
    best.safetensors whenever the fitness improves, epoch{N}.pt at each save_period, and at the end
    last.safetensors, last.pt and best.pt (from best.safetensors) once more."""

    def __init__(self, run_dir: Path, args: SimpleNamespace):
        self.folder, self.args = Path(run_dir) / "weights", args

    def epoch_end(self, model: torch.nn.Module, epoch: int, metrics: dict, best: bool, period: bool) -> None:
        """After each epoch, as Ultralytics' trainer: last.pt; best.safetensors and best.pt when the fitness
        improved; the save_period file epoch{N}.pt (N 0-based as there). An interrupted run leaves loadable
        weights."""
        from yoloscale.checkpoint import save_weights

        self.folder.mkdir(exist_ok=True)
        write_ultralytics_pt(model, self.args, self.folder / "last.pt", metrics)
        if best:
            save_weights(model.state_dict(), self.folder / "best.safetensors")
            write_ultralytics_pt(model, self.args, self.folder / "best.pt", metrics)
        if period:
            write_ultralytics_pt(model, self.args, self.folder / f"epoch{epoch}.pt", metrics)

    def final(self, model: torch.nn.Module, metrics: dict) -> None:
        """last.* from the model as it is, then best.pt from best.safetensors, loaded into the same model: under
        ZeRO-3 DeepSpeed instruments modules created after its engine, and such a model cannot be pickled ("Can't
        pickle local object 'instrument_w_nvtx.<locals>.wrapped_fn'")."""
        from yoloscale.checkpoint import save_weights

        self.folder.mkdir(exist_ok=True)
        save_weights(model.state_dict(), self.folder / "last.safetensors")
        write_ultralytics_pt(model, self.args, self.folder / "last.pt", metrics)
        best = self.folder / "best.safetensors"
        if best.is_file():
            model.load_state_dict(load_file(str(best)))
            write_ultralytics_pt(model, self.args, self.folder / "best.pt")


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
    from yoloscale.model import build_model

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

    from yoloscale.backend import layout_of
    from yoloscale.checkpoint.full_state import read_weights
    from yoloscale.checkpoint.trusted import check_folder
    from yoloscale.distill import strip_projector

    if (ckpt / "ema.safetensors").is_file():
        return strip_projector(load_file(str(ckpt / "ema.safetensors")))
    check_folder(ckpt, trust_pickle)
    try:
        from yoloscale.checkpoint import read_state

        backend = read_state(ckpt)["progress"].get("backend", "ddp")
        return strip_projector({k: v.contiguous() for k, v in read_weights(ckpt, layout_of(backend)).items()})
    except Exception as e:
        raise UserError(f"checkpoint '{ckpt}' is corrupt or unreadable: {type(e).__name__}: {e}") from None


def export_run(run: Path, trust_pickle: bool = False) -> list[Path]:
    """`yoloscale export RUN`: write weights/last.pt from the latest checkpoint (its EMA, or with ema=False its model
    weights, whatever the backend; else weights/last.safetensors) and weights/best.pt from weights/best.safetensors,
    without needing the training data or GPUs. A run killed before its end gets weights/last.safetensors too."""
    from yoloscale.checkpoint import complete_checkpoints, find_checkpoint, save_weights
    from yoloscale.config import load_config
    from yoloscale.data import ultralytics_args
    from yoloscale.run_dir import read_run_info

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
    from ultralytics import YOLO
    from ultralytics.engine.exporter import export_formats

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
    from yoloscale.config import parse_command

    if args and "=" not in args[0]:
        args = [f"run={args[0]}", *args[1:]]
    ns, _, _ = parse_command(ExportSettings, args, "export", train_keys=False)
    if not ns.run:
        raise UserError("export: give the run directory (yoloscale export RUN).")
    written = export_run(Path(ns.run), ns.trust_pickle)
    if ns.format:
        from yoloscale.run_dir import read_run_info

        pt = next((p for p in written if p.name == "best.pt"), written[0])
        written.append(export_format(pt, ns, int(read_run_info(Path(ns.run)).get("imgsz", 640))))
    for path in written:
        print(f"wrote {path}")
    return written
