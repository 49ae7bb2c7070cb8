"""Multi-node for real: two nodes as two network namespaces on this machine (two_nodes.py), one launcher agent per
node, gloo over the veth pair between them. A run across the two nodes reaches the same weights as the same global
batch on one node."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from two_nodes import TwoNodes, why_not

pytestmark = [pytest.mark.slow, pytest.mark.skipif(why_not() is not None, reason=str(why_not()))]

TRAIN = ["model=yolov8n.yaml", "imgsz=64", "batch=8", "nbs=16", "workers=0", "epochs=2", "plots=False"]
TIMEOUT = 300


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")


def _weights(run) -> dict:
    return load_file(str(run / "weights" / "last.safetensors"))


@pytest.fixture(scope="module")
def one_node(tiny_data, tmp_path_factory):
    """The reference: the same run as two processes of one node."""
    project = tmp_path_factory.mktemp("one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571"]
    cmd += ["-m", "yoloscale", "train", f"data={tiny_data}", *TRAIN, f"project={project}", "name=run"]
    subprocess.run(cmd, check=True, env=_env(), stdout=subprocess.DEVNULL, timeout=TIMEOUT)
    return _weights(project / "run")


def _on_both(nodes: TwoNodes, command, tmp_path) -> list[subprocess.CompletedProcess]:
    """`command(node)` on both nodes at once; their outputs and exit codes."""
    procs = []
    for node in (0, 1):
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append((nodes.popen(node, command(node), env=_env(), stdout=log, stderr=subprocess.STDOUT), log))
    results = []
    for proc, log in procs:
        proc.wait(timeout=TIMEOUT)
        log.close()
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, open(log.name).read()))
    return results


def test_torchrun_c10d_across_two_nodes_trains_like_one_node(one_node, tiny_data, tmp_path):
    with TwoNodes() as nodes:
        rendezvous = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{nodes.host[0]}:29572", "--rdzv_id", "t1"]

        def torchrun(node):
            return [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                *rendezvous,
                "-m",
                "yoloscale",
                "train",
                f"data={tiny_data}",
                *TRAIN,
                f"project={tmp_path}",
                "name=run",
            ]

        results = _on_both(nodes, torchrun, tmp_path)
    for r in results:
        assert r.returncode == 0, r.stdout[-3000:]
    assert "2 process(es) on cpu" in results[0].stdout + results[1].stdout
    theirs = _weights(tmp_path / "run")
    assert theirs.keys() == one_node.keys()
    assert all(torch.equal(theirs[k], one_node[k]) for k in theirs)


def test_accelerate_launch_across_two_nodes_with_our_config_trains_like_one_node(one_node, tiny_data, tmp_path):
    from helpers import ROOT

    config = ROOT / "launch" / "accelerate" / "ddp-multinode.yaml"
    with TwoNodes() as nodes:

        def accelerate(node):
            return [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(config),
                "--num_machines",
                "2",
                "--num_processes",
                "2",
                "--machine_rank",
                str(node),
                "--main_process_ip",
                nodes.host[0],
                "--main_process_port",
                "29573",
                "-m",
                "yoloscale",
                "train",
                f"data={tiny_data}",
                *TRAIN,
                f"project={tmp_path}",
                "name=run",
            ]

        results = _on_both(nodes, accelerate, tmp_path)
    for r in results:
        assert r.returncode == 0, r.stdout[-3000:]
    theirs = _weights(tmp_path / "run")
    assert all(torch.equal(theirs[k], one_node[k]) for k in theirs)


def test_a_node_lost_mid_epoch_ends_the_job_in_one_line_and_the_run_resumes_to_the_same_weights(tiny_data, tmp_path):
    """kill -9 of one node's agent and worker in epoch 2: the other node's process ends within the bound with one
    line; the same command with resume=auto on both nodes continues from epoch 1's checkpoint to the weights of an
    uninterrupted run."""
    import time

    args = [f"data={tiny_data}", *TRAIN, "epochs=5", "log_interval=1", f"project={tmp_path}", "name=run"]
    reference = tmp_path / "reference"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29574"]
    subprocess.run(
        [*cmd, "-m", "yoloscale", "train", *args, f"project={reference}"],
        check=True,
        env=_env(),
        stdout=subprocess.DEVNULL,
        timeout=TIMEOUT,
    )
    with TwoNodes() as nodes:
        rendezvous = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{nodes.host[0]}:29575"]

        def torchrun(node, rdzv_id, extra=()):
            return [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                *rendezvous,
                "--rdzv_id",
                rdzv_id,
                "-m",
                "yoloscale",
                "train",
                *args,
                *extra,
            ]

        logs = [open(tmp_path / f"node{n}.log", "w") for n in (0, 1)]
        procs = [nodes.popen(n, torchrun(n, "a"), env=_env(), stdout=logs[n], stderr=subprocess.STDOUT) for n in (0, 1)]
        checkpoints = tmp_path / "run" / "checkpoints"
        deadline = time.monotonic() + TIMEOUT
        while not list(checkpoints.glob("step-*-end/COMPLETE")):  # epoch 1 is saved: epoch 2 runs
            assert time.monotonic() < deadline and procs[0].poll() is None, "epoch 1 never ended"
            time.sleep(0.05)
        lost = time.monotonic()
        nodes.lose(1)
        procs[0].wait(timeout=TIMEOUT)
        survivor_s = time.monotonic() - lost
        for log in logs:
            log.close()
        survivor = (tmp_path / "node0.log").read_text()
        assert procs[0].returncode != 0
        assert survivor_s < 60, survivor_s  # not torch's 30-minute collective timeout
        lines = [line for line in survivor.splitlines() if line.startswith("yoloscale: error:")]
        assert lines and "lost contact with another process" in lines[0], survivor[-3000:]
        assert "yoloscale/trainer.py" not in survivor  # our process ended with that line, not a traceback

        results = _on_both(nodes, lambda n: torchrun(n, "b", ["resume=auto"]), tmp_path)
    for r in results:
        assert r.returncode == 0, r.stdout[-3000:]
    resumed, uninterrupted = _weights(tmp_path / "run"), _weights(reference / "run")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
