"""Ultralytics' `device=` key: which GPUs (or the CPU) a run trains on, and several GPUs from one plain command.

`device=0,1,2,3` from `yoloscale train` (no launcher around it) starts torchrun with one process per listed GPU, as
Ultralytics' trainer starts its DDP workers; `device=1` trains on that GPU; `device=-1` (`-1,-1` for two) picks the
GPUs with the most free memory; `device=cpu` trains on the CPU. Indices count the GPUs this process sees (an outer
CUDA_VISIBLE_DEVICES restriction included, as in Ultralytics). The choice reaches CUDA through
CUDA_VISIBLE_DEVICES, set before anything initialises CUDA, so every process sees exactly its run's GPUs. Under a
launcher (torchrun, accelerate, deepspeed, srun) the launcher places the processes: the list must then name as
many GPUs as it started on this node.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import torch

from yoloscale.config import parse_device
from yoloscale.distributed.rendezvous import free_port
from yoloscale.errors import UserError

LAUNCHED = ("RANK", "LOCAL_RANK", "WORLD_SIZE")  # set by every launcher (and by ours for its children)


def distributed_env_from_slurm(env: dict | None = None) -> None:
    """Inside an `srun` step of several tasks, give torch/Accelerate their variables from Slurm's (one task per
    device): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, and MASTER_ADDR/PORT (first node, port from the job id)
    unless already set. Does nothing under torchrun/accelerate/deepspeed (they set RANK) or outside Slurm."""
    env = os.environ if env is None else env
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["LOCAL_WORLD_SIZE"] = env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
    if "MASTER_ADDR" not in env:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True
        ).stdout.split()
        env["MASTER_ADDR"] = hosts[0]
    env.setdefault("MASTER_PORT", str(20000 + int(env["SLURM_JOB_ID"]) % 20000))


def under_launcher(env: dict | None = None) -> bool:
    env = os.environ if env is None else env
    return any(k in env for k in LAUNCHED) or int(env.get("SLURM_NTASKS", "1")) > 1


PROCESS_FLAGS = ("--num_processes", "--nproc_per_node", "--nproc-per-node", "--num_gpus")


def asked_processes(command: list[str]) -> int:
    """How many processes a launcher's command line asks for (0 when it names none)."""
    for i, arg in enumerate(command):
        flag, _, value = arg.partition("=")
        if flag in PROCESS_FLAGS:
            value = value or (command[i + 1] if i + 1 < len(command) else "")
            return int(value) if value.isdigit() else 0
    return 0


def launcher_started_fewer() -> str | None:
    """A warning when the launcher that started this process asked for several and started only this one:
    `accelerate launch --num_processes 2` on a machine without GPUs runs its script once, silently."""
    if under_launcher():
        return None
    try:
        import psutil

        parent = psutil.Process().parent().cmdline()
    except Exception:  # no parent to read (it exited, or another user's)
        return None
    asked = asked_processes(parent)
    if asked <= 1 or not any("accelerate" in part for part in parent[:3]):
        return None
    return (
        f"the launcher was asked for {asked} processes and started one ({' '.join(parent[:3])} ...): without GPUs, "
        "accelerate launch starts several only as ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
        f"--num_processes {asked} ... (docs/launch.md)"
    )


def _idle_gpus(n: int, visible: list[str]) -> list[str]:
    """The n visible GPUs with the most free memory (NVML: no CUDA context is made); the first n without NVML."""
    try:
        # pynvml is optional (NVML through nvidia-ml-py): without it, the first n GPUs
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            phys = [int(v) for v in visible] if visible else list(range(count))
            free = {
                i: pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(p)).free
                for i, p in enumerate(phys)
                if p < count
            }
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML, or GPUs named by UUID: no ranking
        return [str(i) for i in range(n)]
    return [str(i) for i in sorted(free, key=free.get, reverse=True)[:n]]


def physical_ids(ids: list[str], env: dict | None = None) -> str:
    """The CUDA_VISIBLE_DEVICES value for these indices, which count the GPUs visible now."""
    env = os.environ if env is None else env
    visible = [v for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v] if "CUDA_VISIBLE_DEVICES" in env else []
    if ids[0] == "-1":
        ids = _idle_gpus(len(ids), visible)
    if "CUDA_VISIBLE_DEVICES" not in env:
        return ",".join(ids)
    if any(int(i) >= len(visible) for i in ids):
        raise UserError(
            f"device={','.join(ids)}: CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r} leaves {len(visible)} "
            "GPU(s) to this process; indices count those."
        )
    return ",".join(visible[int(i)] for i in ids)


def _check_gpus(device: str, count: int) -> None:
    """After CUDA_VISIBLE_DEVICES is set: torch must see every requested GPU."""

    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if seen < count:
        raise UserError(
            f"device={device}: torch sees {seen} CUDA GPU(s) with CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}; use device=cpu, or indices of GPUs this machine has."
        )


def torchrun_command(args: list[str], processes: int, port: int) -> list[str]:
    """`yoloscale train ARGS` as torchrun's single-node launch of `processes` workers."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "yoloscale",
        "train",
        *args,
    ]


def place(device: str, args: list[str]) -> int | None:
    """Before anything touches CUDA: make `device=` so. Returns None when this process trains, or the exit code of
    the torchrun job it started for several GPUs."""
    ids = parse_device(device)
    if ids in ("", "cpu"):
        return None
    if under_launcher():
        distributed_env_from_slurm()  # under srun: LOCAL_WORLD_SIZE from Slurm's variables
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if len(ids) != local:
            raise UserError(
                f"device={device} names {len(ids)} GPU(s), but the launcher started {local} process(es) on this "
                "node; leave device= out under a launcher, or make the two agree."
            )
        return None  # the launcher placed each process on its GPU
    os.environ["CUDA_VISIBLE_DEVICES"] = physical_ids(ids)
    _check_gpus(device, len(ids))
    if len(ids) == 1:
        return None
    return run_workers(torchrun_command(args, len(ids), free_port()))


def run_workers(command: list[str]) -> int:
    """Run torchrun and wait for it. SIGTERM and SIGUSR1 (a scheduler's notice) go to the training processes, which
    save a checkpoint and stop together; torchrun's agent ignores them (its own SIGTERM handling would kill the
    workers 30 s later, and SIGUSR1 would kill the agent). Ctrl-C reaches the whole process group, as usual."""

    n = command[command.index("--nproc_per_node") + 1]
    print(
        f"yoloscale: starting {n} training processes with torchrun "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')})",
        file=sys.stderr,
        flush=True,
    )
    quiet = (signal.SIGTERM, signal.SIGUSR1)
    env = {**os.environ, "PET_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT"}
    child = subprocess.Popen(command, env=env, preexec_fn=lambda: [signal.signal(s, signal.SIG_IGN) for s in quiet])

    def to_workers(sig: int, _frame) -> None:
        for proc in psutil.Process(child.pid).children(recursive=True):
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    before = {s: signal.signal(s, to_workers) for s in quiet}
    try:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                continue  # the workers got the same Ctrl-C: wait for them to stop
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
