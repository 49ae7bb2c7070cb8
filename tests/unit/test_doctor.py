"""`yoloscale doctor`: topology parsing of nvidia-smi matrices, recommendations, and its CPU-only behaviour."""

from pathlib import Path

import pytest

from helpers import run_cli
from yoloscale.commands.doctor import describe, parse_topo_matrix, recommend

TOPO = Path(__file__).parent / "fixtures" / "topo"


def _load(name):
    return parse_topo_matrix((TOPO / name).read_text())


def test_eight_gpu_nvswitch_node():
    topo = _load("dgx-h100-8gpu-nvswitch.txt")
    assert topo.gpus == [f"GPU{i}" for i in range(8)] and len(topo.links) == 56
    assert set(topo.links.values()) == {"NV18"}
    assert topo.nics == {f"NIC{k}": f"mlx5_{k}" for k in range(4)}
    words = " ".join(describe(topo))
    assert "NVSwitch" in words and "two-socket" in words
    recs = {v: val for v, val, _ in recommend(topo, ["mlx5_0", "mlx5_1"], ["eth0"], {})}
    assert recs["NCCL_IB_HCA"] == "mlx5_0,mlx5_1" and "NCCL_SOCKET_IFNAME" not in recs
    assert "NCCL_P2P_LEVEL" not in recs  # NVLink everywhere: NCCL's default is right


def test_two_gpu_nvlink_node():
    topo = _load("h200x2-nvlink.txt")
    assert topo.links == {("GPU0", "GPU1"): "NV18", ("GPU1", "GPU0"): "NV18"}
    assert "direct NVLink" in " ".join(describe(topo))
    recs = {v: val for v, val, _ in recommend(topo, [], ["ens5"], {})}
    assert recs["NCCL_SOCKET_IFNAME"] == "ens5"  # no InfiniBand


def test_pcie_only_nodes():
    one = _load("pcie-2gpu-one-switch.txt")
    assert "one PCIe switch" in " ".join(describe(one))
    two = _load("pcie-4gpu-two-socket.txt")
    words = " ".join(describe(two))
    assert "across the CPU interconnect" in words and "2 NUMA nodes" in words
    recs = {v: val for v, val, _ in recommend(two, [], ["eth0"], {})}
    assert recs["NCCL_P2P_LEVEL"] == "NODE"


def test_environment_is_never_overridden():
    topo = _load("h200x2-nvlink.txt")
    env = {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_NVLS_ENABLE": "0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    recs = {v: (val, why) for v, val, why in recommend(topo, [], ["ens5"], env)}
    assert recs["NCCL_SOCKET_IFNAME"] == ("ib0", "kept from the environment")
    assert recs["TORCH_NCCL_ASYNC_ERROR_HANDLING"][0] == "1"
    assert recs["NCCL_NVLS_ENABLE"][0] == "0"  # multicast stays off where it is set off


@pytest.mark.skipif(__import__("shutil").which("nvidia-smi") is not None, reason="this machine has NVIDIA GPUs")
def test_doctor_without_gpus_says_so():
    proc = run_cli("doctor", "bench=True")
    assert proc.returncode == 0, proc.stderr
    assert "no NVIDIA GPUs found" in proc.stdout
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=3" in proc.stdout
    assert "needs at least 2 CUDA GPUs on this node; skipped" in proc.stdout


@pytest.mark.slow
def test_allreduce_bandwidth_arithmetic_over_gloo():
    """The bench's measuring code, on two CPU processes over gloo (the CLI itself needs 2 GPUs)."""
    import torch.multiprocessing as mp

    from yoloscale.distributed.rendezvous import free_port

    mp.spawn(_gloo_worker, args=(2, free_port()), nprocs=2)


def _gloo_worker(rank, world, port):
    import os

    import torch.distributed as dist

    from yoloscale.commands.doctor import allreduce_busbw

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ((size, busbw),) = allreduce_busbw(rank, world, [1], "cpu", iters=3)
    assert size == 2**20 and busbw > 0
    dist.destroy_process_group()


def test_link_peak_and_judgement():
    from yoloscale.commands.doctor import judge_busbw, link_peak

    assert link_peak(_load("dgx-h100-8gpu-nvswitch.txt"), "NVIDIA H100 80GB HBM3") == (
        450.0,
        "18 NVLink links x 25 GB/s",
    )
    assert link_peak(_load("h200x2-nvlink.txt"), "NVIDIA H200")[0] == 450.0
    assert link_peak(_load("h200x2-nvlink.txt"), "NVIDIA B200")[0] == 900.0  # NVLink 5: 50 GB/s per link
    peak, how = link_peak(_load("pcie-2gpu-one-switch.txt"), "NVIDIA L40S", pcie_gen=4, pcie_width=16)
    assert round(peak, 1) == 31.5 and how == "PCIe gen4 x16"
    assert link_peak(_load("pcie-2gpu-one-switch.txt")) is None  # PCIe generation unknown: no expectation
    assert link_peak(parse_topo_matrix("")) is None  # one GPU or none
    assert "as expected" in judge_busbw(380.0, 450.0)
    assert "below expectation" in judge_busbw(120.0, 450.0)


def test_export_lines_only_set_what_is_missing_and_quote_values():
    from yoloscale.commands.doctor import export_lines

    recs = recommend(_load("h200x2-nvlink.txt"), [], ["ens5"], {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"})
    lines = export_lines(recs, {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"})
    assert lines == ["export NCCL_SOCKET_IFNAME=ens5"]
    assert export_lines([("NCCL_SOCKET_IFNAME", "a b;$(x)", "")], {}) == ["export NCCL_SOCKET_IFNAME='a b;$(x)'"]


def test_doctor_export_prints_only_shell_lines():
    proc = run_cli("doctor", "export=True")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and all(line.startswith("export ") for line in proc.stdout.splitlines())


def test_captured_matrix_with_underlined_header():
    """Captured on a 2 x H200 host (driver 580, 2026-11-23): nvidia-smi underlines the header with ANSI escapes,
    which hid every GPU from the parser before."""
    from yoloscale.commands.doctor import link_peak

    topo = _load("captured-h200x2-driver580.txt")
    assert topo.gpus == ["GPU0", "GPU1"] and topo.links[("GPU0", "GPU1")] == "NV18"
    assert topo.gpu_numa == {"GPU0": "0", "GPU1": "0"}
    assert link_peak(topo, "NVIDIA H200")[0] == 450.0


def test_interface_lists_mean_what_they_mean_to_nccl_and_gloo():
    from yoloscale.distributed.rendezvous import interface_matches

    assert interface_matches("eth", "eth0") and interface_matches("ib,eth", "eth1")
    assert not interface_matches("=eth", "eth0") and interface_matches("=eth0", "eth0")
    assert not interface_matches("^docker,lo", "lo") and interface_matches("^docker,lo", "ens5")


def test_the_rendezvous_check_says_whether_it_is_reached_and_through_which_interface():
    import socket

    from yoloscale.distributed.rendezvous import check, free_port

    port = free_port()
    lines, route = check(f"localhost:{port}", {})
    assert route == "lo" and "the host answers; nothing listens on the port yet" in lines[0]
    with socket.create_server(("127.0.0.1", 0)) as server:
        up = check(f"127.0.0.1:{server.getsockname()[1]}", {})[0]
    assert "something listens on the port (the rendezvous is up)" in up[0]
    lines, _ = check(f"localhost:{port}", {"GLOO_SOCKET_IFNAME": "eth", "NCCL_SOCKET_IFNAME": "lo"})
    assert len(lines) == 2 and lines[1].startswith(
        "GLOO_SOCKET_IFNAME=eth disagrees with the route to the rendezvous (lo)"
    )
    lines, route = check("no-such-node.invalid:29500", {})
    assert route == "" and "the name does not resolve on this node" in lines[0]
    recs = {v: val for v, val, _ in recommend(parse_topo_matrix(""), [], ["eth0"], {}, route="ens7")}
    assert recs["NCCL_SOCKET_IFNAME"] == "ens7"  # the interface that reaches the rendezvous, not the first one
