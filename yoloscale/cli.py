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
import os
import sys
import textwrap

from yoloscale.errors import UserError, plain
from yoloscale.preemption import Preempted


def _train_help() -> str:
    from yoloscale.config import ULTRALYTICS_FORMS, field_help

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
        import importlib

        from yoloscale.config import command_help

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
        sub, "bench", "throughput, memory and MFU beside Ultralytics' own trainer", "yoloscale.bench:BenchSettings"
    )
    b.add_argument("--only", help=argparse.SUPPRESS)  # internal: one measurement in this process
    _command(
        sub,
        "plan",
        "memory plan: the largest batch per GPU for each backend and grad_ckpt, and its img/s",
        "yoloscale.planner:PlanSettings",
    )
    _command(
        sub,
        "race",
        "Ultralytics' trainer and ours on the same data, one after the other",
        "yoloscale.race:RaceSettings",
    )
    sw = _command(
        sub,
        "sweep",
        "hyperparameter search with Optuna: many trainings at once, pruned by their per-epoch mAP, resumable",
        "yoloscale.sweep.command:SweepSettings",
        usage="yoloscale sweep space.yaml [config.yaml] [key=value ...] | yoloscale sweep --status DIR",
    )
    sw.add_argument("--status", metavar="DIR", default=None, help="print the table of the sweep in DIR and exit")
    d = sub.add_parser("data", help="data utilities").add_subparsers(dest="data_command", required=True)
    _command(
        d,
        "data synth",
        "write the synthetic shapes detection set (data.yaml + YOLO labels)",
        "yoloscale.synth:SynthSettings",
        train_keys=False,
    )
    la = sub.add_parser("launch", help="launch recipes").add_subparsers(dest="launch_command", required=True)
    ls = _command(
        la,
        "launch slurm",
        "write (and optionally submit) an sbatch script for a training run, or a job array for a sweep",
        "yoloscale.launch:SlurmSettings",
    )
    ls.add_argument("--sweep", metavar="SPACE", default=None, help="the same as sweep=SPACE")
    ls.add_argument("--array", metavar="N", default=None, help="the same as array=N")
    _command(
        la,
        "launch templates",
        "copy the shipped Accelerate, Slurm and DeepSpeed templates into a folder",
        "yoloscale.launch:TemplateSettings",
        train_keys=False,
    )
    _command(
        sub,
        "doctor",
        "this node's GPU/network topology and the NCCL settings we recommend",
        "yoloscale.doctor:DoctorSettings",
        train_keys=False,
    )
    _command(
        sub,
        "export",
        "write best.pt/last.pt (Ultralytics) from a run's EMA weights",
        "yoloscale.export:ExportSettings",
        train_keys=False,
        usage="yoloscale export RUN [format=onnx|torchscript|engine|...] [imgsz=N half=True ...]",
    )
    return p


def _with_deepspeed_file(cfg_file: str | None, overrides: list[str], ds_file: str) -> list[str]:
    """`--deepspeed FILE` from DeepSpeed's launcher: our ds_config, and the backend the file's ZeRO stage names
    unless the configuration names one itself (then they must agree)."""
    import yaml

    from yoloscale.backend.zero import stage_of_file
    from yoloscale.config import parse_override

    if not os.path.isfile(ds_file):
        raise UserError(
            f"--deepspeed '{ds_file}' not found (the templates: ds_configs/ in the repository, or "
            "`yoloscale launch templates out=DIR` from an installed package)."
        )
    stage = stage_of_file(ds_file)
    if stage not in (1, 2, 3):
        raise UserError(
            f"--deepspeed '{ds_file}': not a readable DeepSpeed JSON with zero_optimization.stage 1, 2 or 3."
        )
    given = dict(parse_override(a) for a in overrides)
    if cfg_file and "backend" not in given and os.path.isfile(cfg_file):
        try:
            given.update(yaml.safe_load(open(cfg_file)) or {})
        except (yaml.YAMLError, ValueError, TypeError):
            pass  # load_config reports a broken file with its line
    if "backend" in given and given["backend"] != f"zero{stage}":
        raise UserError(
            f"--deepspeed '{ds_file}' asks for ZeRO stage {stage} but our configuration says "
            f"backend={given['backend']}; make them agree."
        )
    return [*overrides, f"backend=zero{stage}", f"ds_config={ds_file}"]


def train(args: list[str], ds_file: str | None = None) -> int:
    """Train here, or (device= naming several GPUs, no launcher around us) start torchrun's processes and wait."""
    from yoloscale.devices import launcher_started_fewer, place
    from yoloscale.errors import warn

    cfg = train_config(args, ds_file)
    if fewer := launcher_started_fewer():
        warn(fewer)
    launched = place(cfg.device, [*args, *(["--deepspeed", ds_file] if ds_file else [])])
    if launched is not None:
        return launched
    from yoloscale.trainer import Trainer

    Trainer(cfg).train()
    return 0


def train_config(args: list[str], ds_file: str | None = None):
    """`yoloscale train`'s arguments -> the run's configuration (a resume's: the run's own, with the overrides)."""
    from yoloscale.config import load_config
    from yoloscale.run_dir import resolve_resume

    args = ["resume=auto" if a == "resume" else a for a in args]  # Ultralytics' bare `resume`
    cfg_file = args[0] if args and "=" not in args[0] else None
    overrides = args[1:] if cfg_file else args
    if cfg_file and not cfg_file.endswith((".yaml", ".yml")):
        raise UserError(f"'{cfg_file}' is neither a YAML config file nor key=value.")
    if ds_file:
        overrides = _with_deepspeed_file(cfg_file, overrides, ds_file)
    cfg = load_config(cfg_file, overrides)
    if cfg.resume:
        cfg, _, _ = resolve_resume(cfg, overrides)
    return cfg


def _run(ns: argparse.Namespace) -> int:
    if ns.command == "train":
        return train(ns.args, ns.deepspeed)
    if ns.command == "bench":
        from yoloscale import bench

        bench.run(ns.args, ns.only)
    elif ns.command == "plan":
        from yoloscale import planner

        planner.run(ns.args)
    elif ns.command == "race":
        from yoloscale import race

        race.main(ns.args)
    elif ns.command == "sweep":
        from yoloscale.sweep import command

        command.run(ns.args, ns.status)
    elif ns.command == "data":
        from yoloscale import synth

        synth.run(ns.args)
    elif ns.command == "launch" and ns.launch_command == "slurm":
        from yoloscale.launch import launch_slurm

        flags = [f"{k}={v}" for k, v in (("sweep", ns.sweep), ("array", ns.array)) if v is not None]
        launch_slurm([*ns.args, *flags])
    elif ns.command == "launch":
        from yoloscale.launch import copy_templates

        copy_templates(ns.args)
    elif ns.command == "doctor":
        from yoloscale import doctor

        doctor.run(ns.args)
    elif ns.command == "export":
        from yoloscale import export

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
        from yoloscale.liveness import lost_peer

        if (lost := lost_peer(e)) is None:
            raise
        print(f"yoloscale: error: {lost}", file=sys.stderr, flush=True)
        return 1
    return code
