"""`yoloscale doctor`: what this node's topology is, and the NCCL / torch environment we recommend, with reasons.

    yoloscale doctor [bench=True] [export=True] [master=HOST:PORT]

Reads the GPUs and their link matrix (`nvidia-smi topo -m`), NUMA nodes, InfiniBand/RoCE devices
(/sys/class/infiniband), network interfaces (/sys/class/net) and the torch/NCCL versions. Recommendations never
override the environment: a variable that is already set is reported as kept (NVLink multicast, NCCL_NVLS_ENABLE,
is never switched on). Works without GPUs (it says so), e.g. on a login node. `bench=True` measures all-reduce bus
bandwidth over the local GPUs (nccl-tests' definition: busbw = bytes / time x 2 (n - 1) / n).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from yoloscale.config import parse_command, setting
from yoloscale.distributed.rendezvous import check, free_port


@dataclass
class Topology:
    gpus: list[str] = field(default_factory=list)
    links: dict[tuple[str, str], str] = field(default_factory=dict)  # (GPU0, GPU1) -> "NV18" | "PIX" | "SYS" ...
    nics: dict[str, str] = field(default_factory=dict)  # NIC0 -> mlx5_0
    gpu_numa: dict[str, str] = field(default_factory=dict)  # GPU0 -> NUMA affinity ("0", "1", "N/A")


def parse_topo_matrix(text: str) -> Topology:
    """Parse `nvidia-smi topo -m` (tab-separated matrix, then legends)."""
    topo = Topology()
    lines = re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()  # nvidia-smi underlines the header on some drivers
    header_i = next((i for i, line in enumerate(lines) if re.match(r"^\s+GPU0\b", line)), None)
    if header_i is None:
        return topo
    header = [c.strip() for c in lines[header_i].split("\t") if c.strip()]
    devices = [c for c in header if re.fullmatch(r"(GPU|NIC)\d+", c)]
    for line in lines[header_i + 1 :]:
        if not line.strip():
            break
        cells = [c.strip() for c in line.split("\t") if c.strip()]  # values line up with the header's columns
        name, values = cells[0], cells[1:]
        if not name.startswith("GPU"):
            continue
        topo.gpus.append(name)
        for other, link in zip(devices, values):
            if other.startswith("GPU") and other != name:
                topo.links[(name, other)] = link
        numa_col = header.index("NUMA Affinity") if "NUMA Affinity" in header else None
        if numa_col is not None and numa_col < len(values):
            topo.gpu_numa[name] = values[numa_col]
    for line in lines:
        m = re.match(r"^\s*(NIC\d+):\s*(\S+)", line)
        if m:
            topo.nics[m.group(1)] = m.group(2)
    return topo


def describe(topo: Topology) -> list[str]:
    """The topology in plain words."""
    if not topo.gpus:
        return ["no NVIDIA GPUs found (nvidia-smi missing or no devices): nothing to tune on this node"]
    n, links = len(topo.gpus), set(topo.links.values())
    words = [f"{n} GPU(s)"]
    if n > 1 and all(link.startswith("NV") for link in links):
        kind = "NVSwitch (every pair on the same NVLink fabric)" if n > 2 else "direct NVLink"
        words.append(f"all GPU pairs linked by NVLink ({', '.join(sorted(links))}): {kind}")
    elif n > 1:
        worst = max(links, key=_pcie_rank)
        words.append(f"GPU pairs over PCIe; slowest path {worst} ({_PCIE_WORDS.get(worst, worst)})")
    numa = sorted({v for v in topo.gpu_numa.values() if v not in ("", "N/A")})
    if len(numa) > 1:
        words.append(f"GPUs on {len(numa)} NUMA nodes ({', '.join(numa)}): a two-socket node")
    if topo.nics:
        words.append(f"NICs in the matrix: {', '.join(topo.nics.values())}")
    return words


_PCIE_WORDS = {
    "PIX": "one PCIe switch",
    "PXB": "several PCIe switches",
    "PHB": "through the CPU's host bridge",
    "NODE": "across host bridges within a NUMA node",
    "SYS": "across the CPU interconnect (sockets)",
}
_PCIE_ORDER = ["PIX", "PXB", "PHB", "NODE", "SYS"]


def _pcie_rank(link: str) -> int:
    return _PCIE_ORDER.index(link) + 1 if link in _PCIE_ORDER else 0


def recommend(
    topo: Topology, ib_devices: list[str], interfaces: list[str], env: dict, route: str = ""
) -> list[tuple[str, str, str]]:
    """(variable, value, why) for this node; variables already in `env` are reported as kept, never replaced.
    `route`: the interface that reaches the job's rendezvous, where known."""
    recs = [
        ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3", "a failed collective tears the job down instead of hanging it"),
    ]
    if ib_devices:
        recs.append(("NCCL_IB_HCA", ",".join(ib_devices), "use the InfiniBand/RoCE adapters for inter-node traffic"))
    elif route and route not in ("?", "lo"):
        recs.append(("NCCL_SOCKET_IFNAME", route, "no InfiniBand: the interface that reaches the rendezvous"))
    elif interfaces:
        recs.append(
            (
                "NCCL_SOCKET_IFNAME",
                interfaces[0],
                "no InfiniBand: pin NCCL's sockets to the main interface "
                "(avoids docker/virtual bridges and 'unhandled system error')",
            )
        )
    links = set(topo.links.values())
    if links and not all(link.startswith("NV") for link in links) and "SYS" in links:
        recs.append(
            (
                "NCCL_P2P_LEVEL",
                "NODE",
                "GPUs across sockets: keep peer-to-peer within a NUMA node; "
                "cross-socket P2P is often slower than going through host memory",
            )
        )
    out = []
    for var, value, why in recs:
        if var in env:
            out.append((var, env[var], "kept from the environment"))
        else:
            out.append((var, value, why))
    if "NCCL_NVLS_ENABLE" in env:
        out.append(("NCCL_NVLS_ENABLE", env["NCCL_NVLS_ENABLE"], "kept from the environment (multicast stays as set)"))
    return out


def read_node() -> tuple[Topology, list[str], list[str]]:
    topo = Topology()
    if shutil.which("nvidia-smi"):
        result = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True)
        if result.returncode == 0:
            topo = parse_topo_matrix(result.stdout)
    ib = (
        sorted(p.name for p in Path("/sys/class/infiniband").glob("*"))
        if Path("/sys/class/infiniband").is_dir()
        else []
    )
    interfaces = []
    for p in sorted(Path("/sys/class/net").glob("*")):
        state = (p / "operstate").read_text().strip() if (p / "operstate").exists() else ""
        if p.name != "lo" and state == "up" and not p.name.startswith(("docker", "veth", "virbr", "br-")):
            interfaces.append(p.name)
    return topo, ib, interfaces


# Per-direction bandwidth of one NVLink link: NVLink 3 (A100) and 4 (H100/H200) 25 GB/s, NVLink 5 (B200/GB200) 50 GB/s.
_NVLINK_GBS = {"B200": 50.0, "GB200": 50.0, "B100": 50.0, "B300": 50.0}
_PCIE_LANE_GBS = {3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}  # per lane and direction, after encoding


def link_peak(topo: Topology, gpu_name: str = "", pcie_gen: int = 0, pcie_width: int = 0) -> tuple[float, str] | None:
    """The slowest GPU pair's link peak in GB/s per direction, which bounds a ring all-reduce's bus bandwidth
    (nccl-tests' busbw is comparable to it), and how it was worked out. None when unknown."""
    if len(topo.gpus) < 2:
        return None
    links = set(topo.links.values())
    if links and all(link.startswith("NV") and link[2:].isdigit() for link in links):
        n = min(int(link[2:]) for link in links)
        per_link = next((v for k, v in _NVLINK_GBS.items() if k in gpu_name), 25.0)
        return n * per_link, f"{n} NVLink links x {per_link:.0f} GB/s"
    if pcie_gen in _PCIE_LANE_GBS and pcie_width:
        return pcie_width * _PCIE_LANE_GBS[pcie_gen], f"PCIe gen{pcie_gen} x{pcie_width}"
    return None


def judge_busbw(measured: float, peak: float) -> str:
    """A healthy link carries most of its peak at large messages; below 60% (our threshold) points at a wrong P2P
    level, a PCIe fallback or a busy link."""
    ratio = measured / peak
    if ratio >= 0.6:
        return f"{ratio:.0%} of the link peak: as expected"
    return (
        f"{ratio:.0%} of the link peak: below expectation; check NCCL_P2P_LEVEL / NCCL_P2P_DISABLE, that "
        "the GPUs are not shared, and NCCL_DEBUG=INFO for the transport chosen"
    )


def export_lines(recs: list[tuple[str, str, str]], env: dict) -> list[str]:
    """Shell lines setting the recommendations the environment does not set yet (values quoted)."""
    return [f"export {var}={shlex.quote(value)}" for var, value, _ in recs if var not in env]


def allreduce_busbw(
    rank: int, world: int, sizes_mb: list[int], device: str, iters: int = 10
) -> list[tuple[int, float]]:
    """Inside an initialised process group: (bytes, bus GB/s) per message size, nccl-tests style."""
    # torch where used: `doctor export=True` runs in every job script and starts without it
    import torch
    import torch.distributed as dist

    results = []
    for mb in sizes_mb:
        t = torch.ones(mb * 2**20 // 4, dtype=torch.float32, device=device)
        for _ in range(3):
            dist.all_reduce(t)
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
        if device != "cpu":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / iters
        results.append((t.numel() * 4, t.numel() * 4 / seconds * 2 * (world - 1) / world / 1e9))
    return results


def _bench_worker(rank: int, world: int, port: int, sizes_mb: list[int], out: dict) -> None:
    # torch where used: `doctor export=True` runs in every job script and starts without it
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    result = allreduce_busbw(rank, world, sizes_mb, f"cuda:{rank}")
    if rank == 0:
        out["busbw"] = result
    dist.destroy_process_group()


def _gpu_info() -> tuple[str, int, int]:
    """(name of GPU 0, its max PCIe generation, its max PCIe width) from nvidia-smi; blanks when unknown."""
    result = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,pcie.link.gen.max,pcie.link.width.max", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    )
    try:
        name, gen, width = (c.strip() for c in result.stdout.splitlines()[0].split(","))
        return name, int(gen), int(width)
    except (IndexError, ValueError):
        return "", 0, 0


@dataclass
class DoctorSettings:
    bench: bool = setting(False, "Also measure all-reduce bus bandwidth over the local GPUs.")
    export: bool = setting(
        False, "Print only `export VAR=value` lines for the recommendations not already set (for scripts)."
    )
    master: str = setting(
        "",
        "A multi-node job's rendezvous, HOST[:PORT] (default: $MASTER_ADDR:$MASTER_PORT): whether this node reaches "
        "it, through which interface, and whether NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME agree.",
    )


def run(args: list[str]) -> None:
    """Entry point of `yoloscale doctor [bench=True] [export=True]`."""

    ns, _, _ = parse_command(DoctorSettings, args, "doctor", train_keys=False)
    topo, ib, interfaces = read_node()
    master = ns.master or os.environ.get("MASTER_ADDR", "")
    if ns.export:  # for `eval "$(yoloscale doctor export=True)"` in job scripts: nothing but export lines
        route = check(master, dict(os.environ))[1] if master else ""
        print("\n".join(export_lines(recommend(topo, ib, interfaces, dict(os.environ), route), dict(os.environ))))
        return
    # torch where used: `doctor export=True` runs in every job script and starts without it
    import torch

    print("topology:")
    for line in describe(topo):
        print(f"  - {line}")
    print(
        f"  - InfiniBand/RoCE devices: {', '.join(ib) or 'none'}; network interfaces up: {', '.join(interfaces) or 'none'}"
    )
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "n/a (no CUDA)"
    print(f"  - torch {torch.__version__}, NCCL {nccl}, {torch.cuda.device_count()} CUDA device(s) visible")
    route = ""
    if master:
        print("multi-node:")
        lines, route = check(master, dict(os.environ))
        for line in lines:
            print(f"  - {line}")
    print("recommended environment (export before launching; already-set variables are kept):")
    for var, value, why in recommend(topo, ib, interfaces, dict(os.environ), route):
        print(f"  export {var}={value}    # {why}")
    if ns.bench:
        n = torch.cuda.device_count()
        if n < 2:
            print("bench: needs at least 2 CUDA GPUs on this node; skipped")
            return
        # torch where used: `doctor export=True` runs in every job script and starts without it
        import torch.multiprocessing as mp

        out = mp.Manager().dict()
        mp.spawn(_bench_worker, args=(n, free_port(), [1, 16, 64, 256, 1024], out), nprocs=n)
        print(f"all-reduce over {n} GPUs (bus bandwidth, nccl-tests definition):")
        for size, busbw in out["busbw"]:
            print(f"  {size / 2**20:>6.0f} MiB  {busbw:7.1f} GB/s")
        peak = link_peak(topo, *_gpu_info())
        best = max(b for _, b in out["busbw"])
        if peak:
            print(
                f"link peak {peak[0]:.0f} GB/s per direction ({peak[1]}); best bus bandwidth {best:.1f} GB/s = "
                f"{judge_busbw(best, peak[0])}"
            )
        else:
            print("link peak unknown for this topology: no expectation to compare with")
