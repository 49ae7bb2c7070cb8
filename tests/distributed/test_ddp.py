"""Two-process DDP on CPU (gloo): one step with 2 x B/2 equals one process with B."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("ddp_step_worker.py")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(WORKER.parent.parent))
    return env


def test_two_process_step_equals_single_process(tiny_data, trained_run, tmp_path):
    single, double = tmp_path / "single.pt", tmp_path / "double.pt"
    args = [str(tiny_data), None, str(tmp_path), str(trained_run / "weights/last.safetensors")]
    args[1] = str(single)
    subprocess.run([sys.executable, str(WORKER), *args], check=True, env=_env())
    args[1] = str(double)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            str(WORKER),
            *args,
        ],
        check=True,
        env=_env(),
    )
    a, b = torch.load(single), torch.load(double)
    for k, v in a["before"].items():
        torch.testing.assert_close(v, b["before"][k], rtol=0, atol=0, msg=k)  # same initial weights
    moved = [k for k, v in a["after"].items() if not torch.equal(v, a["before"][k])]
    assert len(moved) > 100  # the step changed the weights...
    for k in moved:  # ...by the same update in both set-ups (compared on the update, not the weights)
        da, db = a["after"][k] - a["before"][k], b["after"][k] - b["before"][k]
        # fp32 rounding of after - before is up to ~eps x |weight| per element: for a tiny update of a large weight
        # (a BatchNorm gain near 1 moving by 1e-6) that alone changes the norm ratio by more than 1e-4
        rounding = 4 * torch.finfo(torch.float32).eps * a["before"][k].abs().max() * da.numel() ** 0.5 / da.norm()
        assert db.norm() / da.norm() == pytest.approx(1.0, abs=1e-4 + float(rounding)), k
        # element-wise, the update is a small difference of large weights: allow its fp32 rounding
        torch.testing.assert_close(da, db, rtol=0, atol=1e-2 * da.abs().max().item(), msg=k)


def test_two_process_training_run(tiny_data, tmp_path, monkeypatch, capfd):
    """The whole loop under torchrun: sharded data, distributed validation, one checkpoint, rank 0 writes. Started
    as Ultralytics users start it, `yoloscale train device=0,1` from a plain command: the torchrun job it builds
    runs here with two gloo processes on the CPU (only the parent's check that two GPUs exist is skipped)."""
    from yoloscale.distributed import devices

    args = [f"data={tiny_data}", "model=yolov8n.yaml", "imgsz=96", "batch=8", "nbs=16", "workers=0", "epochs=1"]
    args += [f"project={tmp_path}", "name=ddp", "plots=False", "device=0,1"]
    for key, value in _env().items():
        monkeypatch.setenv(key, value)
    for key in (*devices.LAUNCHED, "CUDA_VISIBLE_DEVICES", "SLURM_NTASKS"):
        monkeypatch.setenv(key, "")  # recorded, so that what place() sets is undone after the test
        monkeypatch.delenv(key)
    monkeypatch.setattr(devices, "_check_gpus", lambda device, count: None)
    assert devices.place("0,1", args) == 0
    out = capfd.readouterr()
    assert "starting 2 training processes with torchrun (CUDA_VISIBLE_DEVICES=0,1)" in out.err
    assert "2 process(es) on cpu" in out.out + out.err
    run = tmp_path / "ddp"
    rows = (run / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and "metrics/mAP50(B)" in rows[0]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000006-end"]  # 96 images / (2 x 8)
    assert (run / "checkpoints/step-00000006-end/random_states_1.pkl").exists()  # every rank's RNG is saved
    assert (run / "weights/last.pt").exists()


def test_a_signal_to_one_rank_stops_both_at_the_same_step(tiny_data, tmp_path):
    """SIGUSR1 reaches one worker only: the max all-reduce at the logging interval makes both ranks save the same
    checkpoint and exit cleanly."""
    import signal
    import time

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29535",
        "-m",
        "yoloscale",
        "train",
        f"data={tiny_data}",
        "model=yolov8n.yaml",
        "imgsz=96",
        "batch=4",
        "nbs=8",
        "workers=0",
        "epochs=5",
        "log_interval=1",
        "val=False",
        f"project={tmp_path}",
        "name=sig",
        "plots=False",
    ]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "sig"
    deadline = time.time() + 120
    while not (run / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(3)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]  # the stop's checkpoint
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()
    assert not (run / "weights" / "last.safetensors").exists()  # stopped, not finished: no final weights


def test_accelerate_launch_runs_two_gloo_processes(tiny_data, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` with ACCELERATE_USE_CPU=1: the CPU form that yields two
    processes (`--cpu --num_processes 2` starts only one)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29536",
        "-m",
        "yoloscale",
        "train",
        f"data={tiny_data}",
        "model=yolov8n.yaml",
        "imgsz=96",
        "batch=4",
        "nbs=8",
        "workers=0",
        "epochs=1",
        "val=False",
        f"project={tmp_path}",
        "name=acc",
        "plots=False",
    ]
    proc = subprocess.run(cmd, env=dict(_env(), ACCELERATE_USE_CPU="1"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout + proc.stderr
    assert (tmp_path / "acc" / "weights" / "last.pt").exists()


AGREE_WORKER = """
import sys
from pathlib import Path
import torch.distributed as dist
from yoloscale.memory.planner import _agree
dist.init_process_group("gloo")
rank = dist.get_rank()
batch, layers = _agree(40 + 7 * rank, [rank, 5], dist.get_world_size())  # the ranks measured different fits
Path(sys.argv[1], f"rank{rank}.txt").write_text(f"agreed {batch} {layers}")  # a file each: no interleaved prints
dist.destroy_process_group()
"""


def test_every_rank_agrees_on_one_batch_auto_value(tiny_data, tmp_path):
    """Each rank measures its own device; all take the smallest batch and rank 0's layers. And a two-process run
    with batch=auto trains (a disagreement would break DDP's collectives)."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE_WORKER)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path),
        ],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["agreed 40 [0, 5]"] * 2
    env = dict(_env(), YOLOSCALE_CACHE=str(tmp_path / "cache"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29539",
        "-m",
        "yoloscale",
        "train",
        f"data={tiny_data}",
        "model=yolov8n.yaml",
        "imgsz=96",
        "batch=auto",
        "workers=0",
        "epochs=1",
        "val=False",
        f"project={tmp_path}",
        "name=auto",
        "plots=False",
        "optimizer=SGD",
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    import yaml

    assert yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["device_batch"] >= 1
