"""No rank hangs a job: a rank frozen with SIGSTOP under torchrun (two gloo processes) ends the job within the
heartbeat bound, with one line naming it, instead of the collective timeout (liveness.py)."""

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from helpers import ROOT, TINY

pytestmark = pytest.mark.slow
HEARTBEAT_S = 10
# heartbeat_s, a beat interval of slack, then torchrun's grace before it SIGKILLs a worker that ignores SIGTERM (a
# stopped one does) and some seconds of start-up noise on a loaded 2-core machine
BOUND_S = HEARTBEAT_S + 5 + 30 + 25


def _rank_pid(launcher: psutil.Process, rank: int) -> int | None:
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "yoloscale" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def _start_training(tiny_data, tmp_path, name: str, *extra: str, prefix=(), env_extra=None):
    """A long two-process gloo run under torchrun (after `prefix`, e.g. a shell wrapper), started in its own session;
    returns, once its first optimizer step is done, the process and `output()`, all its output so far (all of it once
    the process has ended)."""
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "yoloscale",
        "train",
        f"data={tiny_data}",
        *TINY,
        "epochs=500",
        "val=False",
        *extra,
        f"project={tmp_path}",
        f"name={name}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env_extra or {}))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()

    def output() -> str:
        if proc.poll() is not None:
            reader.join(timeout=10)  # the pipe is read to its end
        return "".join(lines)

    deadline = time.monotonic() + 300
    while not any("first optimizer step" in line for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(output()[-3000:])
        time.sleep(0.5)
    return proc, output


def test_a_frozen_rank_ends_the_job_within_the_heartbeat_bound(tiny_data, tmp_path):
    proc, output = _start_training(tiny_data, tmp_path, "f", f"heartbeat_s={HEARTBEAT_S}")
    frozen = None
    try:
        frozen = _rank_pid(psutil.Process(proc.pid), 1)
        assert frozen is not None
        os.kill(frozen, signal.SIGSTOP)
        stopped_at = time.monotonic()
        proc.wait(timeout=BOUND_S + 60)
        took = time.monotonic() - stopped_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if frozen is not None and psutil.pid_exists(frozen):
            os.kill(frozen, signal.SIGKILL)
    out = output()
    assert proc.returncode != 0
    assert "rank 1 has shown no sign of life" in out, out[-3000:]
    assert took < BOUND_S, f"the job took {took:.0f} s to end\n{out[-3000:]}"


def test_sigterm_to_the_whole_step_saves_and_ends_torchrun_cleanly(tiny_data, tmp_path):
    """As Slurm cancels a step: SIGTERM to every process of the step, torchrun started the way our
    templates start it (slurm_scripts.py's QUIET_LAUNCHER). The training processes save and exit 0; so does torchrun, with
    no traceback of its own."""
    from yoloscale.distributed.slurm_scripts import QUIET_LAUNCHER

    signals = QUIET_LAUNCHER.split("=", 1)[1].split()[0]
    wrapper = ("bash", "-c", 'trap "" USR1 TERM; exec "$@"', "launcher")
    proc, output = _start_training(
        tiny_data, tmp_path, "t", prefix=wrapper, env_extra={"PET_SIGNALS_TO_HANDLE": signals}
    )
    try:
        everyone = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in everyone:  # as Slurm signals every process of a step (torchrun gives its workers their own group)
            p.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = output()
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "SignalException" not in out, out[-3000:]
    assert "stop signal received: checkpoint" in out
    assert any((tmp_path / "t" / "checkpoints").iterdir())
