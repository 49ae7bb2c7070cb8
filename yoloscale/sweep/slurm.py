"""`yoloscale launch slurm sweep=space.yaml array=N [config.yaml] [key=value ...]` (also `--sweep space.yaml --array N`):
a Slurm job array whose N tasks are sweep workers, one node each with its GPUs, all pulling trials from one study in
the sweep folder (a journal file on the shared filesystem, or `storage=` an RDB URL).

Slurm's warning signal (`--signal=USR1@90`) makes a worker stop its trials with a checkpoint, queue them to be
continued, and requeue its own array task; any worker continues queued trials. Submitting the script again
continues the sweep.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from yoloscale.errors import UserError

SCRIPT = """#!/bin/bash
# {title}
#SBATCH --job-name={job_name}
#SBATCH --array=0-{last}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
{gpu_line}#SBATCH --cpus-per-task={cpus}
#SBATCH --time={time}
{optional_lines}#SBATCH --output={out}/slurm-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@{signal_lead}
#SBATCH --requeue
set -euo pipefail

# sbatch passes the submitting shell's environment on: drop launcher variables (a trial is a job of its own).
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
# What `yoloscale doctor` recommends for this node (NCCL, for trials of several GPUs).
eval "$({python} -m yoloscale doctor export=True)"
srun --kill-on-bad-exit=1 {python} -m yoloscale sweep {sweep_args}
"""


def split_sweep_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(the Slurm keys, the sweep's own command line: its settings, a config file and training keys)."""
    from yoloscale.config import fields_of, split_override
    from yoloscale.launch import SlurmSettings

    slurm_keys = fields_of(SlurmSettings)[0]
    slurm, sweep = [], []
    for arg in args:
        (slurm if "=" in arg and split_override(arg)[0] in slurm_keys else sweep).append(arg)
    return slurm, sweep


def launch_sweep_array(args: list[str]) -> Path:
    from yoloscale.config import parse_command
    from yoloscale.launch import PLAIN_PATH, SLURM_NAME, SLURM_TIME, SlurmSettings, slurm_value, write_sbatch
    from yoloscale.sweep.command import check_out, check_sweep

    slurm_args, sweep_args = split_sweep_args(args)
    ns, _, _ = parse_command(SlurmSettings, slurm_args, "launch slurm", train_keys=False)
    if ns.array < 1:
        raise UserError("launch slurm sweep=...: give array=N, the number of workers (Slurm array tasks).")
    if ns.nodes != 1 or ns.generic:
        raise UserError("launch slurm sweep=...: every array task is one node (leave nodes= and generic= out).")
    space = str(Path(ns.sweep).resolve())
    settings, cfg_file, train_args, _, _ = check_sweep([space, *sweep_args])
    out = Path(settings.out).resolve()
    given = [a for a in sweep_args if not a.startswith("out=")]
    if cfg_file:
        given = [str(Path(cfg_file).resolve()) if a == cfg_file else a for a in given]
    command = [space, *given, f"out={out}"]
    if ns.gpus_per_node == 0 and not any(a.startswith("gpus=") for a in given):
        command.append("gpus=cpu")
    procs = ns.gpus_per_node or ns.tasks_per_node
    optional = "".join(
        f"#SBATCH --{k}={slurm_value(v, SLURM_NAME, k)}\n"
        for k, v in (("partition", ns.partition), ("account", ns.account))
        if v
    )
    study = settings.study or out.name
    script = SCRIPT.format(
        title=f"Rendered by `yoloscale launch slurm sweep=` on {time.strftime('%Y-%m-%d %H:%M')}: {ns.array} sweep "
        "workers on one study. Submitting this file again continues the sweep.",
        job_name=slurm_value(study, SLURM_NAME, "study"),
        last=ns.array - 1,
        gpu_line=f"#SBATCH --gpus-per-node={ns.gpus_per_node}\n" if ns.gpus_per_node else "",
        cpus=ns.cpus_per_task * procs,
        time=slurm_value(ns.time, SLURM_TIME, "time"),
        optional_lines=optional,
        out=slurm_value(str(out), PLAIN_PATH, "out"),
        signal_lead=ns.signal_lead,
        python=shlex.quote(sys.executable),
        sweep_args=" ".join(shlex.quote(a) for a in command),
    )
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{study}-array.sbatch"
    if path.exists():
        raise UserError(f"'{path}' already exists (it is never overwritten): submit it again with sbatch to continue.")
    return write_sbatch(path, script, ns.submit)
