"""Against a real Slurm (CI starts a one-node cluster with .ci/slurm-up.sh): a rendered sbatch script trains a
2-process CPU DDP run under each launcher (srun tasks, torchrun, accelerate launch); SIGUSR1 leads to a checkpoint,
a requeue and a completed, resumed run, also through a per-node launcher that must not die of the signal."""

import shutil
import subprocess
import time

import pytest

from helpers import TINY, run_cli


def _slurm_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    return "UP" in subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _slurm_up(), reason="no Slurm cluster (.ci/slurm-up.sh)")]


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs():
    """A failed test must not leave its job running (or queued) for the next one."""
    yield
    for job in _submitted:
        subprocess.run(["scancel", job], capture_output=True)
    _submitted.clear()


_submitted: list[str] = []


def _submit(tmp_path, tiny_data, name, *extra, launcher="srun"):
    proc = run_cli(
        "launch",
        "slurm",
        f"launcher={launcher}",
        f"data={tiny_data}",
        "model=yolov8n.yaml",
        "imgsz=96",
        "batch=4",
        "nbs=8",
        "workers=0",
        "plots=False",
        "close_mosaic=0",
        f"project={tmp_path}",
        f"name={name}",
        *extra,
        "gpus_per_node=0",
        "tasks_per_node=2",
        "cpus_per_task=1",
        "time=20",
        "submit=True",
    )
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.split()[-1]  # "Submitted batch job N"
    _submitted.append(job)
    return job


def _in_queue(job: str) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip())


def _wait_gone(job: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while _in_queue(job) and time.time() < deadline:
        time.sleep(1)
    assert not _in_queue(job), f"job {job} still queued after {timeout}s"


@pytest.mark.parametrize("launcher", ["srun", "torchrun", "accelerate"])
def test_sbatch_runs_two_process_ddp(tiny_data, tmp_path, launcher):
    job = _submit(tmp_path, tiny_data, "ddp", "epochs=1", launcher=launcher)
    _wait_gone(job, 300)
    run = tmp_path / "ddp"
    log = (tmp_path / f"ddp-slurm-{job}.out").read_text()
    assert "2 process(es)" in log, log[-3000:]
    assert len((run / "results.csv").read_text().splitlines()) == 2
    assert list((run / "checkpoints").glob("step-*/COMPLETE"))
    assert (run / "weights" / "last.pt").exists()


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_usr1_checkpoints_requeues_and_the_job_resumes(tiny_data, tmp_path, launcher):
    job = _submit(tmp_path, tiny_data, "pre", "epochs=3", "log_interval=1", "val=False", launcher=launcher)
    run = tmp_path / "pre"
    deadline = time.time() + 300
    while not (run / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # into training
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    _wait_gone(job, 600)  # the stop, the requeue and the resumed run to its end
    log = (tmp_path / f"pre-slurm-{job}.out").read_text()
    assert "stop signal received: checkpoint" in log and f"requeued Slurm job {job}" in log, log[-3000:]
    assert "resumed from" in log, log[-3000:]
    assert (run / "weights" / "last.pt").exists()
    rows = (run / "results.csv").read_text().splitlines()
    steps = rows[-1].split(",")[rows[0].split(",").index("optimizer_steps")]
    assert len(rows) == 4 and rows[-1].startswith("3,")  # three epochs, each once, the interrupted one included
    assert sorted((run / "checkpoints").glob("step-*"))[-1].name == f"step-{int(steps):08d}-end"


def test_a_sweep_job_array_of_two_workers_shares_one_study(tiny_data, tmp_path):
    """`launch slurm sweep=... array=2`: two array tasks on the one-node cluster, each a sweep worker, pull the
    trials of one study from the journal in the sweep folder."""
    space = tmp_path / "space.yaml"
    space.write_text("lr0: {type: float, low: 0.005, high: 0.03, log: true}\n")
    out = tmp_path / "sweep"
    proc = run_cli(
        "launch",
        "slurm",
        "--sweep",
        str(space),
        "--array",
        "2",
        f"data={tiny_data}",
        *[a for a in TINY if a != "epochs=2"],
        "epochs=1",
        "trials=4",
        f"out={out}",
        "gpus_per_node=0",
        "cpus_per_task=1",
        "time=20",
        "submit=True",
    )
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.split()[-1]
    _submitted.append(job)
    _wait_gone(job, 600)
    logs = sorted(out.glob(f"slurm-{job}_*.out"))
    assert len(logs) == 2, list(out.iterdir())
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(
        study_name="sweep", storage=JournalStorage(JournalFileBackend(str(out / "study.journal")))
    )
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4, [log.read_text()[-2000:] for log in logs]
    assert {t.user_attrs["worker"]["task"] for t in study.trials} == {0, 1}  # both workers took trials
    assert (out / "sweep.csv").is_file()
