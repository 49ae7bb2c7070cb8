"""The command line. One convention for every command, as Ultralytics' `yolo MODE key=value`:

    yoloscale train [config.yaml] [key=value ...]        yoloscale bench [config.yaml] [key=value ...]
    yoloscale race [config.yaml] [key=value ...]         yoloscale launch slurm [config.yaml] [key=value ...]
    yoloscale plan [config.yaml] [key=value ...]          yoloscale sweep space.yaml [config.yaml] [key=value ...]
    yoloscale launch templates out=DIR                   yoloscale data synth out=DIR [key=value ...]
    yoloscale export RUN                                  yoloscale doctor [bench=True] [export=True]

`yoloscale COMMAND --help` lists the command's keys (config.parse_command checks them, with "did you mean").
Bad input ends with one line `yoloscale: error: ...` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap

from yoloscale.config import ULTRALYTICS_FORMS, command_help, field_help
from yoloscale.errors import UserError, plain
from yoloscale.training.preemption import Preempted


def _train_help() -> str:
    lines = ["configuration keys (key=value; defaults are Ultralytics' where it has the key):", ""]
    for name, default, doc in field_help():
        lines.append(f"  {name} (default {default})")
        lines.extend(textwrap.wrap(doc, 100, initial_indent="      ", subsequent_indent="      "))
    for name, doc in ULTRALYTICS_FORMS.items():
        lines += [f"  {name}", f"      {doc}"]
    return "\n".join(lines)


def _command(sub, name: str, help: str, settings: str | None, train_keys: bool = True, usage: str | None = None):
    """A subcommand taking `[config.yaml] key=value ...`; `settings` names its dataclass (module:class) for --help
    (imported only when help is asked for: `doctor export=True` runs in every job script)."""
    epilog = ""
    if settings and _HELP:
        module, _, cls = settings.partition(":")
        epilog = command_help(getattr(importlib.import_module(module), cls), name, train_keys)
    p = sub.add_parser(
        name.split()[-1],
        help=help,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=usage or f"yoloscale {name} {'[config.yaml] ' if train_keys else ''}[key=value ...]",
    )
    p.add_argument(
        "args", nargs="*", help="key=value settings" + (", after an optional YAML file" if train_keys else "")
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # launchers add it
    return p


_HELP = False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="yoloscale", description="Train Ultralytics YOLO detectors at scale.")
    # DeepSpeed's launcher with --module puts --local_rank=N right after the module name, before `train`.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="train a detector",
        epilog=_train_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="yoloscale train [config.yaml] [key=value ...]",
    )
    t.add_argument("args", nargs="*", help="an optional YAML config file, then key=value overrides")
    t.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    # DeepSpeed's launcher passes its JSON this way (`deepspeed ... --deepspeed FILE`): accepted as it comes.
    t.add_argument(
        "--deepspeed",
        "--deepspeed_config",
        metavar="JSON",
        default=None,
        help="DeepSpeed JSON (as `deepspeed ... --deepspeed FILE` passes it): sets ds_config= and, unless "
        "backend= is given, backend=zero<stage of the file>",
    )
    b = _command(
        sub,
        "bench",
        "throughput, memory and MFU beside Ultralytics' own trainer",
        "yoloscale.commands.bench:BenchSettings",
    )
    b.add_argument("--only", help=argparse.SUPPRESS)  # internal: one measurement in this process
    _command(
        sub,
        "plan",
        "memory plan: the largest batch per GPU for each backend and grad_ckpt, and its img/s",
        "yoloscale.commands.plan:PlanSettings",
    )
    _command(
        sub,
        "race",
        "Ultralytics' trainer and ours on the same data, one after the other",
        "yoloscale.commands.race:RaceSettings",
    )
    sw = _command(
        sub,
        "sweep",
        "hyperparameter search with Optuna: many trainings at once, pruned by their per-epoch mAP, resumable",
        "yoloscale.commands.sweep:SweepSettings",
        usage="yoloscale sweep space.yaml [config.yaml] [key=value ...] | yoloscale sweep --status DIR",
    )
    sw.add_argument("--status", metavar="DIR", default=None, help="print the table of the sweep in DIR and exit")
    d = sub.add_parser("data", help="data utilities").add_subparsers(dest="data_command", required=True)
    _command(
        d,
        "data synth",
        "write the synthetic shapes detection set (data.yaml + YOLO labels)",
        "yoloscale.commands.synth:SynthSettings",
        train_keys=False,
    )
    la = sub.add_parser("launch", help="launch recipes").add_subparsers(dest="launch_command", required=True)
    ls = _command(
        la,
        "launch slurm",
        "write (and optionally submit) an sbatch script for a training run, or a job array for a sweep",
        "yoloscale.commands.launch:SlurmSettings",
    )
    ls.add_argument("--sweep", metavar="SPACE", default=None, help="the same as sweep=SPACE")
    ls.add_argument("--array", metavar="N", default=None, help="the same as array=N")
    _command(
        la,
        "launch templates",
        "copy the shipped Accelerate, Slurm and DeepSpeed templates into a folder",
        "yoloscale.commands.launch:TemplateSettings",
        train_keys=False,
    )
    _command(
        sub,
        "doctor",
        "this node's GPU/network topology and the NCCL settings we recommend",
        "yoloscale.commands.doctor:DoctorSettings",
        train_keys=False,
    )
    _command(
        sub,
        "export",
        "write best.pt/last.pt (Ultralytics) from a run's EMA weights",
        "yoloscale.commands.export:ExportSettings",
        train_keys=False,
        usage="yoloscale export RUN [format=onnx|torchscript|engine|...] [imgsz=N half=True ...]",
    )
    return p


def _run(ns: argparse.Namespace) -> int:
    """Each subcommand's module (commands/) is imported when it runs, so `yoloscale --help` and the `doctor
    export=True` of every job script start without torch or Ultralytics."""
    if ns.command == "train":
        from yoloscale.commands.train import train

        return train(ns.args, ns.deepspeed)
    if ns.command == "bench":
        from yoloscale.commands import bench

        bench.run(ns.args, ns.only)
    elif ns.command == "plan":
        from yoloscale.commands import plan

        plan.run(ns.args)
    elif ns.command == "race":
        from yoloscale.commands import race, race_panel

        cfg_file, given, settings = race.split_args(ns.args)
        (race_panel.run_panel if settings["panel"] else race.race)(cfg_file, given, settings)
    elif ns.command == "sweep":
        from yoloscale.commands import sweep

        sweep.run(ns.args, ns.status)
    elif ns.command == "data":
        from yoloscale.commands import synth

        synth.run(ns.args)
    elif ns.command == "launch" and ns.launch_command == "slurm":
        from yoloscale.commands.launch import launch_slurm

        flags = [f"{k}={v}" for k, v in (("sweep", ns.sweep), ("array", ns.array)) if v is not None]
        launch_slurm([*ns.args, *flags])
    elif ns.command == "launch":
        from yoloscale.commands.launch import copy_templates

        copy_templates(ns.args)
    elif ns.command == "doctor":
        from yoloscale.commands import doctor

        doctor.run(ns.args)
    elif ns.command == "export":
        from yoloscale.commands import export

        export.run(ns.args)
    return 0


def _options_first(argv: list[str]) -> list[str]:
    """`train`'s launcher options (`--deepspeed FILE`, `--local_rank=N`), which launchers put anywhere among our
    key=value arguments, move to just after `train`: argparse takes positionals only up to the first option."""
    if "train" not in argv:
        return argv
    at = argv.index("train") + 1
    head, rest, options, plain = argv[:at], argv[at:], [], []
    with_value = ("--deepspeed", "--deepspeed_config", "--local_rank", "--local-rank")
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in with_value and i + 1 < len(rest):
            options += rest[i : i + 2]
            i += 2
            continue
        (options if arg.split("=", 1)[0] in with_value else plain).append(arg)
        i += 1
    return [*head, *options, *plain]


def main(argv: list[str] | None = None) -> int:
    global _HELP
    os.environ.setdefault("YOLO_OFFLINE", "1")  # Ultralytics: no online checks or downloads, ever
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")  # ... nor pip installs (e.g. pi-heif for an unreadable image)
    _HELP = any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv))
    ns = _parser().parse_args(_options_first(sys.argv[1:] if argv is None else argv))
    try:
        code = _run(ns)
    except UserError as e:
        print(f"yoloscale: error: {plain(str(e))}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"yoloscale: {e}", file=sys.stderr)
        return 0  # the work is saved; under Slurm the job was requeued
    except KeyboardInterrupt:
        print("yoloscale: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:  # torch's distributed errors are RuntimeErrors
        from yoloscale.distributed.liveness import lost_peer

        if (lost := lost_peer(e)) is None:
            raise
        print(f"yoloscale: error: {lost}", file=sys.stderr, flush=True)
        return 1
    return code
