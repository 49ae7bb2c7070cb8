"""Ultralytics' device= key: the GPUs a run sees, and the torchrun job several GPUs start (distributed/devices.py). The job
itself runs in tests/distributed/test_ddp.py."""

import sys

import pytest

from yoloscale.distributed import devices
from yoloscale.errors import UserError


@pytest.fixture
def plain_command(monkeypatch):
    """A process started by hand: no launcher's variables, no outer CUDA_VISIBLE_DEVICES."""
    for key in (*devices.LAUNCHED, "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored after the test
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")


def test_indices_count_the_gpus_an_outer_restriction_leaves():
    assert devices.physical_ids(["0", "1"], {}) == "0,1"
    assert devices.physical_ids(["1", "2"], {"CUDA_VISIBLE_DEVICES": "4,5,6"}) == "5,6"
    with pytest.raises(UserError, match="leaves 1 GPU"):
        devices.physical_ids(["1"], {"CUDA_VISIBLE_DEVICES": "3"})


def test_several_gpus_start_one_torchrun_process_per_gpu(plain_command, monkeypatch):
    import os

    started = []
    monkeypatch.setattr(devices, "_check_gpus", lambda device, count: None)
    monkeypatch.setattr(devices, "run_workers", lambda command: started.append(command) or 0)
    assert devices.place("2,3", ["data=d.yaml", "device=2,3"]) == 0
    (command,) = started
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[command.index("--nproc_per_node") + 1] == "2"
    assert command[-5:] == ["-m", "yoloscale", "train", "data=d.yaml", "device=2,3"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"  # the workers see exactly those, as cuda:0 and cuda:1


def test_one_gpu_trains_in_this_process_on_that_gpu(plain_command, monkeypatch):
    import os

    monkeypatch.setattr(devices, "_check_gpus", lambda device, count: None)
    assert devices.place("1", ["device=1"]) is None and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert devices.place("cpu", ["device=cpu"]) is None


def test_a_gpu_this_machine_does_not_have_is_one_line(plain_command, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="device=0,1: torch sees 0 CUDA GPU"):
        devices.place("0,1", ["device=0,1"])


def test_under_a_launcher_the_device_list_must_match_its_processes(plain_command, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(UserError, match="names 2 GPU.*started 4 process"):
        devices.place("0,1", ["device=0,1"])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert devices.place("0,1", ["device=0,1"]) is None  # our own torchrun's workers


def test_a_launcher_that_started_one_of_several_processes_is_named(plain_command, monkeypatch):
    import psutil

    assert devices.asked_processes(["accelerate", "launch", "--num_processes", "2", "-m", "x"]) == 2
    assert devices.asked_processes(["torchrun", "--nproc-per-node=4", "t.py"]) == 4
    assert devices.asked_processes(["python", "t.py"]) == 0
    parent = ["/usr/bin/python3", "/usr/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "yoloscale"]
    monkeypatch.setattr(psutil.Process, "parent", lambda self: type("P", (), {"cmdline": lambda _: parent})())
    assert "asked for 2 processes and started one" in devices.launcher_started_fewer()
    monkeypatch.setenv("RANK", "0")  # the launcher did start its processes
    assert devices.launcher_started_fewer() is None
