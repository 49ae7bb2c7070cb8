"""`yoloscale launch slurm`: render (and optionally submit) an sbatch script for a training run; `yoloscale launch
templates`: copy the shipped launcher templates out of the package.

    yoloscale launch slurm [config.yaml] [key=value ...] nodes=2 gpus_per_node=8 [launcher=srun]
                           [partition=P] [account=A] [time=24:00:00] [cpus_per_task=12] [submit=True]
    yoloscale launch slurm sweep=space.yaml array=N [config.yaml] [key=value ...]   (a sweep: a job array of workers)

Launchers (how the training processes are started inside the allocation):
  srun        one Slurm task per GPU running `python -m yoloscale train`; yoloscale maps SLURM_PROCID /
              SLURM_NTASKS / SLURM_LOCALID to RANK / WORLD_SIZE / LOCAL_RANK itself. Nothing sits between Slurm
              and the training processes. The default.
  torchrun    one task per node running torchrun (c10d rendezvous on the first node), which starts one process
              per GPU.
  accelerate  one task per node running `accelerate launch` (machine rank = SLURM_NODEID).
  deepspeed   one task per node running DeepSpeed's launcher without ssh (`--no_ssh --node_rank`), with a
              hostfile written from the allocation; needs backend=zero1|zero2|zero3.
The rendezvous is the job's first node on a port derived from the job id. `--signal=USR1@90` + `--requeue`: the run
checkpoints on the signal and requeues itself; the requeued script resumes. Slurm signals every process of a job
step, so the per-node launchers are started with SIGUSR1 ignored (its default action would kill the launcher and,
with it, the run), and torchrun / `accelerate launch` with SIGTERM ignored too (they would turn it into a traceback
and exit 1 once the run has saved); the training processes install their own handler.

`generic=True` writes a reusable template instead: the training settings come from the sbatch command line
(`sbatch FILE.sbatch my.yaml name=exp1`) and a requeued job resumes with `resume=auto`; the package ships four
(`yoloscale launch templates out=DIR` copies them out).

Every value that reaches the script is validated and shell-quoted, so a configuration value containing `$(...)`,
`;`, quotes or newlines stays literal.

`yoloscale launch slurm sweep=space.yaml array=N [config.yaml] [key=value ...]` (also `--sweep space.yaml --array N`):
a Slurm job array whose N tasks are sweep workers, one node each with its GPUs, all pulling trials from one study in
the sweep folder (a journal file on the shared filesystem, or `storage=` an RDB URL).

Slurm's warning signal (`--signal=USR1@90`) makes a worker stop its trials with a checkpoint, queue them to be
continued, and requeue its own array task; any worker continues queued trials. Submitting the script again
continues the sweep.
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from yoloscale.backend import backend_class
from yoloscale.commands.settings import training_config
from yoloscale.commands.sweep import check_out, check_sweep
from yoloscale.config import fields_of, parse_command, setting, split_override
from yoloscale.distributed.slurm_scripts import (
    LAUNCHERS,
    PLAIN_PATH,
    RESUME_BAKED,
    SLURM_NAME,
    SLURM_TIME,
    SWEEP_ARRAY,
    render_generic,
    render_script,
    slurm_value,
    write_sbatch,
)
from yoloscale.errors import UserError


def render_sbatch(
    cfg_file: str | None,
    overrides: list[str],
    nodes: int,
    gpus_per_node: int,
    tasks_per_node: int,
    cpus_per_task: int,
    time_limit: str,
    partition: str = "",
    account: str = "",
    signal_lead: int = 90,
    launcher: str = "srun",
) -> tuple[str, Path]:
    """The sbatch script for this configuration and the run directory it trains into."""
    cfg = training_config(cfg_file, overrides)  # validates every key and value before anything is written
    if cfg.resume:
        raise UserError("launch slurm: leave resume= out; the script resumes from its run's checkpoints by itself.")
    if launcher == "deepspeed" and backend_class(cfg.backend).accelerate_name != "deepspeed":
        raise UserError(f"launcher=deepspeed runs DeepSpeed: set backend=zero1|zero2|zero3 (now {cfg.backend}).")
    if not cfg.name:
        cfg = dataclasses.replace(cfg, name=time.strftime("slurm-%Y%m%d-%H%M%S"))
        overrides = [*overrides, f"name={cfg.name}"]
    run_dir = Path(cfg.project).resolve() / cfg.name
    args = ([str(Path(cfg_file).resolve())] if cfg_file else []) + [
        o if not o.startswith("project=") else f"project={Path(cfg.project).resolve()}" for o in overrides
    ]
    if not any(o.startswith("project=") for o in overrides):
        args.append(f"project={Path(cfg.project).resolve()}")  # absolute: the job may start in another directory
    if not cfg.exist_ok:
        args.append("exist_ok=True")  # the run directory the script resumes, never a name2 beside it
    project = slurm_value(str(run_dir.parent), PLAIN_PATH, "project")
    script = render_script(
        launcher,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        tasks_per_node=tasks_per_node,
        cpus_per_task=cpus_per_task,
        time_limit=time_limit,
        partition=partition,
        account=account,
        signal_lead=signal_lead,
        job_name=cfg.name,
        log=f"{project}/{cfg.name}-slurm-%j.out",
        title=f"Rendered by `yoloscale launch slurm` on {time.strftime('%Y-%m-%d %H:%M')}. "
        "Resubmitting this file continues the run from its last checkpoint.",
        resume_block=RESUME_BAKED.format(run_dir=shlex.quote(str(run_dir))),
        shared_dir=shlex.quote(project),
        train_args=" ".join(shlex.quote(a) for a in args),
        python=shlex.quote(sys.executable),
    )
    return script, run_dir


@dataclass
class SlurmSettings:
    nodes: int = setting(1, "Nodes of the job.")
    gpus_per_node: int = setting(8, "GPUs per node, one training process each (0: CPU nodes).")
    tasks_per_node: int = setting(1, "Processes per node when gpus_per_node=0.")
    cpus_per_task: int = setting(8, "CPU cores per training process.")
    time: str = setting("24:00:00", "Slurm time limit ([D-]HH:MM:SS or minutes).")
    partition: str = setting("", "Slurm partition.")
    account: str = setting("", "Slurm account.")
    signal_lead: int = setting(
        90, "Seconds of warning (SIGUSR1) before the time limit: the run checkpoints and requeues."
    )
    launcher: str = setting(
        "srun", "srun: one task per GPU; torchrun / accelerate / deepspeed: one launcher per node.", LAUNCHERS
    )
    submit: bool = setting(False, "Run sbatch on the written script.")
    generic: bool = setting(
        False, "Print a reusable template that takes the training settings from sbatch's command line."
    )
    sweep: str = setting(
        "",
        "A sweep's search space (space.yaml): write a job array of sweep workers instead of a training run; the "
        "other keys are the sweep's (yoloscale sweep --help) and training keys.",
    )
    array: int = setting(
        0, "With sweep=: the number of array tasks (workers, one node each) pulling trials from the study."
    )


def launch_slurm(args: list[str]) -> Path | None:
    """`yoloscale launch slurm [config.yaml] key=value ...`: write PROJECT/NAME.sbatch (next to the run directory)
    and submit it if asked; with generic=True, print a template instead."""
    if any("=" in a and split_override(a)[0] == "sweep" for a in args):
        return launch_sweep_array(args)
    ns, cfg_file, overrides = parse_command(SlurmSettings, args, "launch slurm")
    if ns.array:
        raise UserError("launch slurm: array= goes with sweep=space.yaml (a job array of sweep workers).")
    if ns.generic:
        if cfg_file or overrides or ns.submit:
            raise UserError(
                "generic=True writes a template that takes the training settings from sbatch's command "
                "line: give no training keys here and no submit=True."
            )
        print(
            render_generic(
                ns.launcher,
                ns.nodes,
                ns.gpus_per_node,
                ns.tasks_per_node,
                ns.cpus_per_task,
                ns.time,
                ns.signal_lead,
                ns.partition,
                ns.account,
            ),
            end="",
        )
        return None
    script, run_dir = render_sbatch(
        cfg_file,
        overrides,
        ns.nodes,
        ns.gpus_per_node,
        ns.tasks_per_node,
        ns.cpus_per_task,
        ns.time,
        ns.partition,
        ns.account,
        ns.signal_lead,
        ns.launcher,
    )
    path = run_dir.parent / f"{run_dir.name}.sbatch"
    if path.exists():
        raise UserError(f"'{path}' already exists; choose another name= (it is never overwritten).")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_sbatch(path, script, ns.submit)


@dataclass
class TemplateSettings:
    out: str = setting(
        "", "Folder to copy the shipped templates into (required): accelerate/, slurm/, deepspeed/ and ds_configs/."
    )


def copy_templates(args: list[str]) -> Path:
    """`yoloscale launch templates out=DIR`: the Accelerate, Slurm and DeepSpeed templates shipped in the package."""
    ns, _, _ = parse_command(TemplateSettings, args, "launch templates", train_keys=False)
    if not ns.out:
        raise UserError("launch templates: give out=DIR, the folder to copy the templates into.")
    out = Path(ns.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"launch templates: '{out}' is not empty; choose another out=.")
    templates = Path(str(resources.files("yoloscale") / "templates"))
    shutil.copytree(templates / "launch", out, dirs_exist_ok=True)
    shutil.copytree(templates / "ds_configs", out / "ds_configs")
    print(f"wrote {out}")
    return out


# --- launch slurm sweep=: a job array of sweep workers ----------------------------------------------------------
def split_sweep_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(the Slurm keys, the sweep's own command line: its settings, a config file and training keys)."""
    slurm_keys = fields_of(SlurmSettings)[0]
    slurm, sweep = [], []
    for arg in args:
        (slurm if "=" in arg and split_override(arg)[0] in slurm_keys else sweep).append(arg)
    return slurm, sweep


def launch_sweep_array(args: list[str]) -> Path:
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
    script = SWEEP_ARRAY.format(
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
