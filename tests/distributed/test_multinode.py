"""Multi-node for real: two nodes as two network namespaces on this machine (two_nodes.py), one launcher agent per
node, gloo over the veth pair between them. A run across the two nodes reaches the same weights as the same global
batch on one node."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from two_nodes import SlurmOnTwoNodes, TwoNodes, slurm_why_not, why_not

pytestmark = [pytest.mark.slow, pytest.mark.skipif(why_not() is not None, reason=str(why_not()))]

TRAIN = ["model=yolov8n.yaml", "imgsz=64", "batch=8", "nbs=16", "workers=0", "epochs=2", "plots=False"]
TIMEOUT = 150


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TRAIN_MODULE = ["-m", "yoloscale", "train"]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")


def _weights(run) -> dict:
    return load_file(str(run / "weights" / "last.safetensors"))


def _assert_same_weights(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


def _one_node(args: list[str], port: int) -> None:
    """`yoloscale train ARGS` as two processes of one node: the reference."""
    cmd = [*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port), *TRAIN_MODULE, *args]
    subprocess.run(cmd, check=True, env=_env(), stdout=subprocess.DEVNULL, timeout=TIMEOUT)


def _torchrun_c10d(nodes: TwoNodes, port: int, rdzv_id: str, args: list[str]) -> list[str]:
    """One agent of a two-node torchrun job, rendezvous on node 0."""
    rendezvous = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{nodes.host[0]}:{port}", "--rdzv_id", rdzv_id]
    return [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", *rendezvous, *TRAIN_MODULE, *args]


@pytest.fixture(scope="module")
def one_node(tiny_data, tmp_path_factory):
    """The reference: the same run as two processes of one node."""
    project = tmp_path_factory.mktemp("one")
    _one_node([f"data={tiny_data}", *TRAIN, f"project={project}", "name=run"], 29571)
    return _weights(project / "run")


def _on_both(nodes: TwoNodes, command, tmp_path, late_s: float = 0.0) -> list[subprocess.CompletedProcess]:
    """`command(node)` on both nodes (node 1 `late_s` after node 0); their outputs; both must succeed."""
    import time

    procs = []
    for node in (0, 1):
        if node == 1:
            time.sleep(late_s)
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append((nodes.popen(node, command(node), env=_env(), stdout=log, stderr=subprocess.STDOUT), log))
    results = []
    for proc, log in procs:
        proc.wait(timeout=TIMEOUT)
        log.close()
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, open(log.name).read()))
    for r in results:
        assert r.returncode == 0, r.stdout[-3000:]
    return results


def test_torchrun_c10d_across_two_nodes_trains_like_one_node_with_one_node_a_minute_late(one_node, tiny_data, tmp_path):
    args = [f"data={tiny_data}", *TRAIN, f"project={tmp_path}", "name=run"]
    with TwoNodes() as nodes:
        results = _on_both(nodes, lambda node: _torchrun_c10d(nodes, 29572, "t1", args), tmp_path, late_s=60)
    assert "2 process(es) on cpu" in results[0].stdout + results[1].stdout
    _assert_same_weights(_weights(tmp_path / "run"), one_node)


def test_accelerate_launch_across_two_nodes_with_our_config_trains_like_one_node(one_node, tiny_data, tmp_path):
    from helpers import ROOT

    config = ROOT / "launch" / "accelerate" / "ddp-multinode.yaml"
    args = [f"data={tiny_data}", *TRAIN, f"project={tmp_path}", "name=run"]
    with TwoNodes() as nodes:

        def accelerate(node):
            machines = ["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(node)]
            main = [
                "--main_process_ip",
                nodes.host[0],
                "--main_process_port",
                "29573",
                "--rdzv_conf",
                "join_timeout=300",
            ]
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
            return [*launch, *machines, *main, *TRAIN_MODULE, *args]

        _on_both(nodes, accelerate, tmp_path)
    _assert_same_weights(_weights(tmp_path / "run"), one_node)


def test_a_node_lost_mid_epoch_ends_the_job_in_one_line_and_the_run_resumes_to_the_same_weights(tiny_data, tmp_path):
    """kill -9 of one node's agent and worker in epoch 2: the other node's process ends within the bound with one
    line; the same command with resume=auto on both nodes continues from epoch 1's checkpoint to the weights of an
    uninterrupted run."""
    import time

    args = [f"data={tiny_data}", *TRAIN, "epochs=5", "log_interval=1", f"project={tmp_path}", "name=run"]
    reference = tmp_path / "reference"
    _one_node([*args, f"project={reference}"], 29574)
    with TwoNodes() as nodes:
        logs = [open(tmp_path / f"node{n}.log", "w") for n in (0, 1)]
        command = _torchrun_c10d(nodes, 29575, "a", args)
        procs = [nodes.popen(n, command, env=_env(), stdout=logs[n], stderr=subprocess.STDOUT) for n in (0, 1)]
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
        assert "yoloscale/training/trainer.py" not in survivor  # our process ended with that line, not a traceback

        _on_both(nodes, lambda node: _torchrun_c10d(nodes, 29575, "b", [*args, "resume=auto"]), tmp_path)
    _assert_same_weights(_weights(tmp_path / "run"), _weights(reference / "run"))


def test_a_network_partition_ends_the_processes_of_both_sides_within_heartbeat_s(tiny_data, tmp_path):
    """The link between the nodes goes down in epoch 2 and every process lives on: nothing fails, the collectives
    and the store's calls just wait. Each side's training process ends within heartbeat_s (20 s here) with one line:
    node 0's rank 0 hears nothing from rank 1, node 1's rank 1 gets no answer from the store on node 0."""
    import time

    args = [f"data={tiny_data}", *TRAIN, "epochs=5", "log_interval=1", "heartbeat_s=20", f"project={tmp_path}"]
    with TwoNodes() as nodes:
        logs = [open(tmp_path / f"node{n}.log", "w") for n in (0, 1)]
        command = _torchrun_c10d(nodes, 29582, "p", [*args, "name=run"])
        procs = [nodes.popen(n, command, env=_env(), stdout=logs[n], stderr=subprocess.STDOUT) for n in (0, 1)]
        deadline = time.monotonic() + TIMEOUT
        while not list((tmp_path / "run" / "checkpoints").glob("step-*-end/COMPLETE")):
            assert time.monotonic() < deadline and procs[0].poll() is None, "epoch 1 never ended"
            time.sleep(0.05)
        cut = time.monotonic()
        nodes.partition()
        procs[0].wait(timeout=TIMEOUT)  # node 0's launcher ends with its worker
        node0_s = time.monotonic() - cut
        line = "yoloscale: error: the job's rendezvous store"
        while line not in (tmp_path / "node1.log").read_text():
            assert time.monotonic() - cut < 60, (tmp_path / "node1.log").read_text()[-3000:]
            time.sleep(0.2)
        node1_s = time.monotonic() - cut
        for log in logs:
            log.close()
    node0 = (tmp_path / "node0.log").read_text()
    assert procs[0].returncode != 0 and node0_s < 60, (node0_s, node0[-3000:])
    assert "yoloscale: error: rank 1 has shown no sign of life" in node0, node0[-3000:]
    assert 20 <= node1_s < 60


def test_doctor_on_a_node_says_whether_it_reaches_the_rendezvous_and_through_which_interface():
    """From node 1: node 0's rendezvous address answers through the veth link; gloo pinned to loopback disagrees
    with that route (one line); an address nobody holds is not reached."""

    def doctor(nodes, *args, env=None):
        proc = nodes.popen(
            1,
            [sys.executable, "-m", "yoloscale", "doctor", *args],
            env=env or _env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        return proc.communicate(timeout=TIMEOUT)[0]

    with TwoNodes() as nodes:
        ok = doctor(nodes, f"master={nodes.host[0]}:29576")
        assert f"rendezvous {nodes.host[0]}:29576 ({nodes.addr[0]}): the host answers" in ok, ok
        assert f"reached through {nodes.links[1]}" in ok and f"NCCL_SOCKET_IFNAME={nodes.links[1]}" in ok
        pinned = doctor(nodes, f"master={nodes.host[0]}:29576", env={**_env(), "GLOO_SOCKET_IFNAME": "lo"})
        assert f"GLOO_SOCKET_IFNAME=lo disagrees with the route to the rendezvous ({nodes.links[1]})" in pinned
        nobody = nodes.addr[0].rsplit(".", 1)[0] + ".99"
        lost = doctor(nodes, f"master={nobody}:29576")
        assert f"rendezvous {nobody}:29576 ({nobody}): NOT reached" in lost, lost


def test_a_wrong_rendezvous_address_ends_both_nodes_in_bounded_time(tiny_data, tmp_path):
    """Node 1 is given an address nobody holds: its launcher gives up after the store's read timeout (torch's
    default 60 s; 10 s here) with the reason on its last line. Node 0, alone at the right address, ends at its join
    timeout (the templates set 300 s; 20 s here) instead of waiting for ever."""
    import time

    from yoloscale.distributed.slurm_scripts import JOIN_TIMEOUT_S

    assert JOIN_TIMEOUT_S <= 300
    args = [f"data={tiny_data}", *TRAIN, f"project={tmp_path}", "name=run"]
    with TwoNodes() as nodes:
        nobody = nodes.addr[0].rsplit(".", 1)[0] + ".99"

        def agent(endpoint: str) -> list[str]:
            rendezvous = ["--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "w"]
            conf = ["--rdzv_conf", "join_timeout=20,read_timeout=10"]
            return [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", *rendezvous, *conf, *TRAIN_MODULE, *args]

        start = time.monotonic()
        procs = [
            nodes.popen(
                0,
                agent(f"{nodes.host[0]}:29577"),
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
            nodes.popen(
                1, agent(f"{nobody}:29577"), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            ),
        ]
        outs, ended = [], []
        for proc in procs:
            outs.append(proc.communicate(timeout=TIMEOUT)[0])
            ended.append(time.monotonic() - start)
    assert all(proc.returncode != 0 for proc in procs)
    assert ended[0] < 60 and "RendezvousTimeoutError" in outs[0].strip().splitlines()[-1], outs[0][-2000:]
    assert ended[1] < 60 and "RendezvousConnectionError" in outs[1].strip().splitlines()[-1], outs[1][-2000:]
    assert not (tmp_path / "run").exists()  # no training process started


@pytest.mark.skipif(slurm_why_not() is None, reason="Slurm runs the templates on two nodes here (the test below)")
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_the_multinode_slurm_templates_run_across_two_nodes(launcher, one_node, tiny_data, tmp_path):
    """Where Slurm's daemons or munged are missing: the shipped multi-node sbatch template (rendered for CPU nodes,
    one process each) run on both nodes as Slurm would run its batch step there: `srun` and `scontrol` stand-ins give each node its SLURM_NODEID and the
    job's host list; the rendezvous is the template's own (first host, port from the job id)."""
    from yoloscale.distributed.slurm_scripts import render_generic

    script = tmp_path / "job.sbatch"
    script.write_text(render_generic(launcher, nodes=2, gpus_per_node=0, tasks_per_node=1))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    with TwoNodes() as nodes:
        stand_ins = {
            "srun": 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"',
            "scontrol": f"printf '{nodes.host[0]}\\n{nodes.host[1]}\\n'",
            "python3": f'exec {sys.executable} "$@"',
        }
        for name, body in stand_ins.items():
            (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
            (bin_dir / name).chmod(0o755)
        args = [f"data={tiny_data}", *TRAIN, f"project={tmp_path}", "name=run"]

        def batch_step(node):
            return ["bash", str(script), *args]

        def env(node):
            return dict(
                _env(),
                PATH=f"{bin_dir}:{os.environ['PATH']}",
                SLURM_JOB_ID="4242",
                SLURM_JOB_NODELIST=",".join(nodes.host),
                SLURM_JOB_NUM_NODES="2",
                SLURM_NODEID=str(node),
                SLURM_SUBMIT_DIR=str(tmp_path),
            )

        procs = []
        for node in (0, 1):
            log = open(tmp_path / f"node{node}.log", "w")
            procs.append(
                (nodes.popen(node, batch_step(node), env=env(node), stdout=log, stderr=subprocess.STDOUT), log)
            )
        for proc, log in procs:
            proc.wait(timeout=TIMEOUT)
            log.close()
        for node, (proc, _) in enumerate(procs):
            assert proc.returncode == 0, (tmp_path / f"node{node}.log").read_text()[-3000:]
    _assert_same_weights(_weights(tmp_path / "run"), one_node)


@pytest.mark.skipif(slurm_why_not() is not None, reason=str(slurm_why_not()))
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_the_multinode_slurm_templates_run_on_a_two_node_slurm_cluster(launcher, one_node, tiny_data, tmp_path):
    """The shipped multi-node sbatch template submitted to a real Slurm cluster of the two nodes (slurmctld and a
    slurmd in each namespace): Slurm allocates both nodes, srun starts the template's launcher on each, and the
    run reaches the weights of one node."""
    from yoloscale.distributed.slurm_scripts import render_generic

    script = tmp_path / "job.sbatch"
    script.write_text(render_generic(launcher, nodes=2, gpus_per_node=0, tasks_per_node=1))
    bin_dir = tmp_path / "bin"  # the template runs python3: the interpreter of these tests
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/bash\nexec {sys.executable} "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    args = [f"data={tiny_data}", *TRAIN, f"project={tmp_path}", "name=run"]
    env = dict(_env(), PATH=f"{bin_dir}:{os.environ['PATH']}")
    with TwoNodes() as nodes, SlurmOnTwoNodes(nodes, tmp_path / "slurm") as slurm:
        job = slurm.sbatch(["--cpus-per-task=1", str(script), *args], cwd=tmp_path, env=env, timeout=TIMEOUT)
        outputs = "".join(p.read_text() for p in tmp_path.glob("yoloscale-*.out"))
        assert job.returncode == 0, (job.stderr + outputs)[-3000:]
    assert "Submitted batch job" in job.stdout
    _assert_same_weights(_weights(tmp_path / "run"), one_node)
