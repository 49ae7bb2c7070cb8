"""Slurm batch scripts: the header every job shares, one launch line per launcher (srun, torchrun, accelerate,
deepspeed), the resume block, and the job array of sweep workers. Every value that reaches a script is validated and
shell-quoted by the caller (commands/launch.py), so a configuration value containing `$(...)`, `;`, quotes or
newlines stays literal."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from yoloscale.errors import UserError

LAUNCHERS = ("srun", "torchrun", "accelerate", "deepspeed")
SLURM_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")  # partitions, accounts, job names
PLAIN_PATH = re.compile(r"^[A-Za-z0-9_./+-]+$")  # what an #SBATCH --output line can hold without quoting
SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # minutes | [D-]HH[:MM[:SS]]

HEADER = """#!/bin/bash
# {title}
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
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads it all: no SIGPIPE under pipefail
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT
# sbatch passes the submitting shell's environment on: drop launcher variables that would override Slurm's ranks.
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE
# What `yoloscale doctor` recommends for this node (NCCL interfaces/adapters, fail-fast error handling, timeouts);
# a variable already set in the environment wins.
eval "$({python} -m yoloscale doctor export=True)"
export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-{cpus_per_process}}}"
{cpu_line}
{resume_block}
"""

RESUME_BAKED = """RUN_DIR={run_dir}
RESUME=()
if compgen -G "$RUN_DIR/checkpoints/step-*/COMPLETE" > /dev/null; then
  RESUME=("resume=$RUN_DIR")  # a requeued (or resubmitted) job continues its run
fi"""

RESUME_GENERIC = """RESUME=()
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
  RESUME=("resume=auto")  # a requeued job continues its run (give name= so it finds the right one)
fi"""

# torchrun's agent (also inside `accelerate launch`) turns a SIGTERM into a traceback and exit 1, after forwarding it
# to the training processes and killing them 30 s later, even when they saved and exited 0. Slurm sends SIGTERM to
# every process of the step, so the agent ignores it (its signal list without SIGTERM, through torchrun's PET_
# variable) and the training processes, which handle it, save, exit 0 and end the agent cleanly.
QUIET_LAUNCHER = """export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT  # SIGTERM is for the training processes"""

# A node that cannot join the rendezvous (a wrong address, a node that never starts) ends the job after this many
# seconds instead of torch's 600 (its `join_timeout`); Slurm starts a job's nodes within seconds of each other.
JOIN_TIMEOUT_S = 300

# The launch line of each launcher; {train} is `yoloscale train ARGS "${RESUME[@]}"`.
BODIES = {
    "srun": """srun --kill-on-bad-exit=1 {python} -m {train}""",
    "torchrun": """{quiet_launcher}
# shellcheck disable=SC2016  # $@ expands inside the task's shell
srun --kill-on-bad-exit=1 bash -c 'trap "" USR1 TERM; exec "$@"' launcher \\
  {python} -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node={procs} \\
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" \\
  --rdzv_conf=join_timeout={join_timeout} -m {train}""",
    "accelerate": """{quiet_launcher}
# shellcheck disable=SC2016  # SLURM_NODEID expands inside each node's task
srun --kill-on-bad-exit=1 bash -c 'trap "" USR1 TERM; exec "${{@:1:3}}" --machine_rank="$SLURM_NODEID" "${{@:4}}"' launcher \\
  {python} -m accelerate.commands.launch --multi_gpu --num_machines="$SLURM_JOB_NUM_NODES" \\
  --num_processes=$((SLURM_JOB_NUM_NODES * {procs})) --main_process_ip="$MASTER_ADDR" \\
  --main_process_port="$MASTER_PORT" --rdzv_backend=c10d --rdzv_conf=join_timeout={join_timeout} \\
  -m {train}""",
    "deepspeed": """# DeepSpeed's launcher reads the nodes from a hostfile; --no_ssh starts each node's share from its own task.
# The training configuration must say backend=zero1|zero2|zero3.
HOSTFILE={shared_dir}/deepspeed-hostfile-$SLURM_JOB_ID
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed 's/$/ slots={procs}/' > "$HOSTFILE"
# shellcheck disable=SC2016  # SLURM_NODEID expands inside each node's task
srun --kill-on-bad-exit=1 bash -c 'trap "" USR1; exec "${{@:1:3}}" --node_rank="$SLURM_NODEID" "${{@:4}}"' launcher \\
  {python} -m deepspeed.launcher.runner --hostfile="$HOSTFILE" --no_ssh --master_addr="$MASTER_ADDR" \\
  --master_port="$MASTER_PORT" --module {train}""",
}


def slurm_value(value: str, pattern: re.Pattern, flag: str) -> str:
    if not pattern.match(value):
        raise UserError(f"key '{flag}' {value!r} is not a valid Slurm value (allowed: {pattern.pattern}).")
    return value


def render_script(
    launcher: str,
    *,
    nodes: int,
    gpus_per_node: int,
    tasks_per_node: int,
    cpus_per_task: int,
    time_limit: str,
    partition: str,
    account: str,
    signal_lead: int,
    title: str,
    job_name: str,
    log: str,
    resume_block: str,
    shared_dir: str,
    train_args: str,
    python: str,
) -> str:
    """Fill the header and the launcher's body (values already validated and quoted)."""
    if launcher not in LAUNCHERS:
        raise UserError(f"launcher={launcher!r}: choose one of {', '.join(LAUNCHERS)}.")
    for flag, v in (("nodes", nodes), ("cpus_per_task", cpus_per_task), ("tasks_per_node", tasks_per_node)):
        if v < 1:
            raise UserError(f"key '{flag}' must be >= 1, got {v}.")
    if gpus_per_node < 0 or signal_lead < 10:
        raise UserError("key 'gpus_per_node' must be >= 0 and 'signal_lead' >= 10 seconds.")
    if launcher == "deepspeed" and gpus_per_node == 0:
        raise UserError("launcher=deepspeed needs GPUs (gpus_per_node >= 1); on CPU nodes use srun or torchrun.")
    procs = gpus_per_node or tasks_per_node  # training processes per node: one per GPU, or tasks_per_node on CPUs
    per_node = launcher != "srun"  # one launcher task per node, holding all of the node's CPUs
    optional = "".join(
        f"#SBATCH --{k}={slurm_value(v, SLURM_NAME, k)}\n"
        for k, v in (("partition", partition), ("account", account))
        if v
    )
    accelerate_on_cpu = launcher == "accelerate" and not gpus_per_node
    header = HEADER.format(
        title=title,
        job_name=slurm_value(job_name, SLURM_NAME, "name"),
        nodes=nodes,
        tasks_per_node=1 if per_node else procs,
        gpu_line=f"#SBATCH --gpus-per-node={gpus_per_node}\n" if gpus_per_node else "",
        cpus_per_task=cpus_per_task * procs if per_node else cpus_per_task,
        cpus_per_process=cpus_per_task,
        time=slurm_value(time_limit, SLURM_TIME, "time"),
        optional_lines=optional,
        log=log,
        signal_lead=signal_lead,
        python=python,
        resume_block=resume_block,
        cpu_line="export ACCELERATE_USE_CPU=1  # CPU nodes: gloo processes\n" if accelerate_on_cpu else "",
    )
    body = BODIES[launcher].format(
        python=python,
        procs=procs,
        shared_dir=shared_dir,
        train=f'yoloscale train {train_args} "${{RESUME[@]}}"',
        quiet_launcher=QUIET_LAUNCHER,
        join_timeout=JOIN_TIMEOUT_S,
    )
    return header + body + "\n"


def render_generic(
    launcher: str,
    nodes: int,
    gpus_per_node: int,
    tasks_per_node: int = 1,
    cpus_per_task: int = 8,
    time_limit: str = "24:00:00",
    signal_lead: int = 90,
    partition: str = "",
    account: str = "",
) -> str:
    """A reusable template: `sbatch FILE [config.yaml] [key=value ...]` (the files in launch/slurm/)."""
    return render_script(
        launcher,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        tasks_per_node=tasks_per_node,
        cpus_per_task=cpus_per_task,
        time_limit=time_limit,
        partition=partition,
        account=account,
        signal_lead=signal_lead,
        job_name="yoloscale",
        log="%x-%j.out",
        title=f"yoloscale, {launcher} launcher. Usage: sbatch [--nodes N --partition P --account A] THIS_FILE "
        "[config.yaml] key=value ... name=RUN\n# (made by `yoloscale launch slurm generic=True`; "
        "python3 must be the environment yoloscale is installed in)",
        resume_block=RESUME_GENERIC,
        shared_dir='"$SLURM_SUBMIT_DIR"',
        train_args='"$@"',
        python="python3",
    )


SWEEP_ARRAY = """#!/bin/bash
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


def write_sbatch(path: Path, script: str, submit: bool) -> Path:
    """Write the rendered script; with submit, run sbatch on it (its error as one line)."""
    path.write_text(script)
    print(f"wrote {path}")
    if submit:
        result = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"sbatch {path} failed: {result.stderr.strip()}")
        print(result.stdout.strip())
    return path
