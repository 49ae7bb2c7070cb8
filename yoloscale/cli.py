"""Command line: `yoloscale train [cfg.yaml] [key=value ...]`, `yoloscale data synth --out DIR`, `yoloscale export RUN`.

Bad input ends with one line `yoloscale: error: ...` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from yoloscale.errors import UserError
from yoloscale.preemption import Preempted


def _train_help() -> str:
    from yoloscale.config import field_help

    lines = ["configuration keys (key=value; defaults train the embedded synthetic quick start):", ""]
    for name, default, doc in field_help():
        lines.append(f"  {name} (default {default})")
        lines.extend(textwrap.wrap(doc, 100, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="yoloscale", description="Train Ultralytics YOLO detectors at scale.")
    # DeepSpeed's launcher with --module puts --local_rank=N right after the module name, before `train`.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a detector", epilog=_train_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       usage="yoloscale train [config.yaml] [key=value ...]")  # fmt: skip
    t.add_argument("args", nargs="*", help="an optional YAML config file, then key=value overrides")
    # DeepSpeed's launcher appends --local_rank=N; the rank is also in the environment, so it is only accepted.
    t.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    t.add_argument("--deepspeed", "--deepspeed_config", metavar="JSON", default=None,
                   help="DeepSpeed JSON (as `deepspeed ... --deepspeed FILE` passes it): sets ds_config= and, unless "
                        "backend= is given, backend=zero<stage of the file>")  # fmt: skip
    d = sub.add_parser("data", help="data utilities")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write the synthetic shapes detection set (data.yaml + YOLO labels)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--train", type=int, default=256, help="number of train images")
    s.add_argument("--val", type=int, default=64, help="number of val images")
    s.add_argument("--size", type=int, default=160, help="image size in pixels")
    s.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("bench", help="throughput, memory and MFU beside Ultralytics' own trainer",
                       usage="yoloscale bench [config.yaml] [key=value ...] [options]")  # fmt: skip
    b.add_argument("args", nargs="*", help="an optional YAML config file, then key=value settings (model, imgsz, ...)")
    b.add_argument("--out", default="runs/bench", help="output folder (bench.json, bench.png, logs)")
    b.add_argument("--precisions", default="bf16,fp16", help="precisions of our loop to measure")
    b.add_argument("--gpus", default="1", help="device counts, e.g. 1,2,8 (several: launched with torchrun)")
    b.add_argument("--loader-workers", default="4,8,16", help="worker counts for the loader-alone measurement")
    b.add_argument("--skip", default="", help="comma list of parts to skip: ultralytics, loader")
    b.add_argument("--warmup", type=int, default=14, help="micro-batches dropped before timing")
    b.add_argument("--window", type=int, default=10, help="micro-batches per timing window")
    b.add_argument("--only", help=argparse.SUPPRESS)  # internal: one measurement in this process
    b.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    la = sub.add_parser("launch", help="launch recipes")
    lsub = la.add_subparsers(dest="launch_command", required=True)
    sl = lsub.add_parser("slurm", help="write (and optionally submit) an sbatch script for a training run",
                         usage="yoloscale launch slurm [config.yaml] [key=value ...] [options]")  # fmt: skip
    sl.add_argument("args", nargs="*", help="an optional YAML config file, then key=value training settings")
    sl.add_argument("--nodes", type=int, default=1)
    sl.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, one task each (0: CPU nodes)")
    sl.add_argument("--tasks-per-node", type=int, default=1, help="processes per node when --gpus-per-node 0")
    sl.add_argument("--cpus-per-task", type=int, default=8)
    sl.add_argument("--time", default="24:00:00", help="Slurm time limit")
    sl.add_argument("--partition", default="")
    sl.add_argument("--account", default="")
    sl.add_argument("--signal-lead", type=int, default=90, help="seconds of warning (SIGUSR1) before the limit")
    sl.add_argument("--launcher", default="srun", choices=["srun", "torchrun", "accelerate", "deepspeed"],
                    help="srun: one task per GPU (default); torchrun / accelerate / deepspeed: one launcher per node")
    sl.add_argument("--submit", action="store_true", help="run sbatch on the written script")
    sl.add_argument("--generic", action="store_true",
                    help="print a reusable template that takes the training arguments from sbatch's command line")
    r = sub.add_parser("race", help="Ultralytics' trainer and ours on the same data, one after the other",
                       usage="yoloscale race [config.yaml] [key=value ...]  (out=, gpus=, sides= are the race's own)")
    r.add_argument("args", nargs="*", help="an optional YAML config file, then key=value settings")
    dr = sub.add_parser("doctor", help="this node's GPU/network topology and the NCCL settings we recommend")
    dr.add_argument("--bench", action="store_true", help="also measure all-reduce bus bandwidth over the local GPUs")
    dr.add_argument("--export", action="store_true",
                    help="print only `export VAR=value` lines for the recommendations not already set (for scripts)")
    e = sub.add_parser("export", help="write best.pt/last.pt (Ultralytics) from a run's EMA weights")
    e.add_argument("run", help="run directory")
    return p


def _with_deepspeed_file(cfg_file: str | None, overrides: list[str], ds_file: str) -> list[str]:
    """`--deepspeed FILE` from DeepSpeed's launcher: our ds_config, and the backend the file's ZeRO stage names
    unless the configuration names one itself (then they must agree)."""
    import yaml

    from yoloscale.backend.zero import stage_of_file
    from yoloscale.config import parse_override

    stage = stage_of_file(ds_file)
    if stage not in (1, 2, 3):
        raise UserError(f"--deepspeed '{ds_file}': not a readable DeepSpeed JSON with zero_optimization.stage 1, 2 or 3.")
    given = dict(parse_override(a) for a in overrides)
    if cfg_file and "backend" not in given and os.path.isfile(cfg_file):
        try:
            given.update(yaml.safe_load(open(cfg_file)) or {})
        except (yaml.YAMLError, ValueError, TypeError):
            pass  # load_config reports a broken file with its line
    if "backend" in given and given["backend"] != f"zero{stage}":
        raise UserError(f"--deepspeed '{ds_file}' asks for ZeRO stage {stage} but our configuration says "
                        f"backend={given['backend']}; make them agree.")
    return [*overrides, f"backend=zero{stage}", f"ds_config={ds_file}"]


def train(args: list[str], ds_file: str | None = None) -> None:
    from yoloscale.config import load_config
    from yoloscale.run_dir import resolve_resume
    from yoloscale.trainer import Trainer

    cfg_file = args[0] if args and "=" not in args[0] else None
    overrides = args[1:] if cfg_file else args
    if cfg_file and not cfg_file.endswith((".yaml", ".yml")):
        raise UserError(f"'{cfg_file}' is neither a YAML config file nor key=value.")
    if ds_file:
        overrides = _with_deepspeed_file(cfg_file, overrides, ds_file)
    cfg = load_config(cfg_file, overrides)
    if cfg.resume:
        cfg, _, _ = resolve_resume(cfg, overrides)
    Trainer(cfg).train()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("YOLO_OFFLINE", "1")  # Ultralytics: no online checks or downloads, ever
    ns = _parser().parse_args(argv)
    try:
        if ns.command == "train":
            train(ns.args, ns.deepspeed)
        elif ns.command == "data":
            from yoloscale.synth import write_synthetic_dataset

            path = write_synthetic_dataset(ns.out, ns.train, ns.val, ns.size, ns.seed)
            print(f"wrote {path}")
        elif ns.command == "bench":
            from yoloscale import bench

            bench.run(ns)
        elif ns.command == "race":
            from yoloscale import race

            race.main(ns.args)
        elif ns.command == "launch":
            from yoloscale.launch import launch_slurm

            launch_slurm(ns)
        elif ns.command == "doctor":
            from yoloscale import doctor

            doctor.run(ns)
        elif ns.command == "export":
            from yoloscale.export import export_run

            for path in export_run(ns.run):
                print(f"wrote {path}")
    except UserError as e:
        print(f"yoloscale: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"yoloscale: {e}", file=sys.stderr)
        return 0  # the work is saved; under Slurm the job was requeued
    except KeyboardInterrupt:
        print("yoloscale: interrupted", file=sys.stderr)
        return 130
    return 0
