"""`yoloscale launch slurm`: render (and optionally submit) an sbatch script for a training run.

    yoloscale launch slurm [config.yaml] [key=value ...] --nodes 2 --gpus-per-node 8 [--partition P] [--account A]
                           [--time 24:00:00] [--cpus-per-task 12] [--submit]

One Slurm task per GPU (`srun` starts `python -m yoloscale train` on every GPU of every node); yoloscale maps
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID to torch's RANK / WORLD_SIZE / LOCAL_RANK itself, so no second launcher
sits between Slurm and the training processes and Slurm's signals reach them directly. The rendezvous is the first
node of the job on a port derived from the job id. `--signal=USR1@90` + `--requeue`: the run checkpoints on the
signal and requeues itself; the requeued script finds the checkpoint and resumes.

Every value that reaches the script is validated and shell-quoted, so a configuration value containing `$(...)`,
`;`, quotes or newlines stays literal.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from yoloscale.errors import UserError

_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")  # partitions, accounts, job names
_PLAIN_PATH = re.compile(r"^[A-Za-z0-9_./+-]+$")  # what an #SBATCH --output line can hold without quoting
_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # minutes | [D-]HH[:MM[:SS]]

TEMPLATE = """#!/bin/bash
# Rendered by `yoloscale launch slurm` on {date}. Resubmitting this file continues the run from its last checkpoint.
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={tasks_per_node}
{gpu_line}#SBATCH --cpus-per-task={cpus_per_task}
#SBATCH --time={time}
{optional_lines}#SBATCH --output={log}
#SBATCH --open-mode=append
#SBATCH --signal=USR1@{signal_lead}
#SBATCH --requeue
set -euo pipefail

# Rendezvous on the job's first node, on a port derived from the job id (stable across a requeue).
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT
# sbatch passes the submitting shell's environment on: drop launcher variables that would override Slurm's ranks.
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE
# Fail fast instead of hanging when a rank dies; values already set in the environment win.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${{TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}}"
export YOLOSCALE_DIST_TIMEOUT="${{YOLOSCALE_DIST_TIMEOUT:-1800}}"
export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}}"

RUN_DIR={run_dir}
RESUME=()
if compgen -G "$RUN_DIR/checkpoints/step-*/COMPLETE" > /dev/null; then
  RESUME=("resume=$RUN_DIR")  # a requeued (or resubmitted) job continues its run
fi

srun --kill-on-bad-exit=1 {python} -m yoloscale train {train_args} "${{RESUME[@]}}"
"""


def _check(value: str, pattern: re.Pattern, flag: str) -> str:
    if not pattern.match(value):
        raise UserError(f"--{flag} {value!r} is not a valid Slurm value (allowed: {pattern.pattern}).")
    return value


def render_sbatch(cfg_file: str | None, overrides: list[str], nodes: int, gpus_per_node: int, tasks_per_node: int,
                  cpus_per_task: int, time_limit: str, partition: str = "", account: str = "",
                  signal_lead: int = 90) -> tuple[str, Path]:  # fmt: skip
    """The sbatch script and the run directory it trains into."""
    from yoloscale.config import load_config

    cfg = load_config(cfg_file, overrides)  # validates every key and value before anything is written
    if cfg.resume:
        raise UserError("launch slurm: leave resume= out; the script resumes from its run's checkpoints by itself.")
    if not cfg.name:
        cfg.name = time.strftime("slurm-%Y%m%d-%H%M%S")
        overrides = [*overrides, f"name={cfg.name}"]
    for flag, v in (("nodes", nodes), ("cpus-per-task", cpus_per_task), ("tasks-per-node", tasks_per_node)):
        if v < 1:
            raise UserError(f"--{flag} must be >= 1, got {v}.")
    if gpus_per_node < 0 or signal_lead < 10:
        raise UserError("--gpus-per-node must be >= 0 and --signal-lead >= 10 seconds.")
    tasks = gpus_per_node or tasks_per_node  # one task per GPU; on CPU nodes, --tasks-per-node processes
    run_dir = Path(cfg.project).resolve() / cfg.name
    optional = "".join(f"#SBATCH --{k}={_check(v, _SLURM_NAME, k)}\n" for k, v in
                       (("partition", partition), ("account", account)) if v)  # fmt: skip
    args = ([str(Path(cfg_file).resolve())] if cfg_file else []) + [
        o if not o.startswith("project=") else f"project={Path(cfg.project).resolve()}" for o in overrides]
    if not any(o.startswith("project=") for o in overrides):
        args.append(f"project={Path(cfg.project).resolve()}")  # absolute: the job may start in another directory
    script = TEMPLATE.format(
        date=time.strftime("%Y-%m-%d %H:%M"), job_name=_check(cfg.name, _SLURM_NAME, "name"), nodes=nodes,
        tasks_per_node=tasks, gpu_line=f"#SBATCH --gpus-per-node={gpus_per_node}\n" if gpus_per_node else "",
        cpus_per_task=cpus_per_task, time=_check(time_limit, _SLURM_TIME, "time"), optional_lines=optional,
        log=_check(str(run_dir.parent), _PLAIN_PATH, "project") + f"/{cfg.name}-slurm-%j.out", signal_lead=signal_lead,
        run_dir=shlex.quote(str(run_dir)), python=shlex.quote(sys.executable),
        train_args=" ".join(shlex.quote(a) for a in args),
    )  # fmt: skip
    return script, run_dir


def launch_slurm(ns) -> Path:
    """CLI entry: write PROJECT/NAME.sbatch (next to the run directory) and submit it if asked."""
    cfg_file = ns.args[0] if ns.args and "=" not in ns.args[0] else None
    overrides = ns.args[1:] if cfg_file else list(ns.args)
    script, run_dir = render_sbatch(cfg_file, overrides, ns.nodes, ns.gpus_per_node, ns.tasks_per_node,
                                    ns.cpus_per_task, ns.time, ns.partition, ns.account, ns.signal_lead)  # fmt: skip
    path = run_dir.parent / f"{run_dir.name}.sbatch"
    if path.exists():
        raise UserError(f"'{path}' already exists; choose another name= (it is never overwritten).")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    print(f"wrote {path}")
    if ns.submit:
        result = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"sbatch {path} failed: {result.stderr.strip()}")
        print(result.stdout.strip())
    return path
