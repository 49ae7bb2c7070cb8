"""Whether this node reaches a multi-node job's rendezvous address, and through which network interface
(`yoloscale doctor`, run on every node: `srun yoloscale doctor master=node1:29500`).

Each node must reach the rendezvous (torchrun's c10d store, Accelerate's main process) at MASTER_ADDR:MASTER_PORT,
and NCCL and gloo must open their sockets on the interface that reaches the other nodes. When
NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME name another interface than the route to the rendezvous, the job stalls at its
first collective; doctor says so in one line before the job starts.
"""

from __future__ import annotations

import errno
import socket

import psutil

CONNECT_TIMEOUT_S = 3.0


def check(master: str, env: dict[str, str]) -> tuple[list[str], str]:
    """Lines about `master` (HOST or HOST:PORT; the port defaults to MASTER_PORT, then 29500) from this node, and
    the interface that reaches it ('' if it does not resolve, '?' if unknown)."""
    host, _, port_text = master.partition(":")
    port = int(port_text or env.get("MASTER_PORT") or 29500)
    try:
        address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as e:
        return [
            f"rendezvous {host}:{port}: the name does not resolve on this node ({e.strerror}); every node needs it"
        ], ""
    interface = route_interface(address, port)
    lines = [f"rendezvous {host}:{port} ({address}): {reachability(address, port)}; reached through {interface}"]
    for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
        if env.get(var) and interface != "?" and not interface_matches(env[var], interface):
            lines.append(
                f"{var}={env[var]} disagrees with the route to the rendezvous ({interface}): the job's sockets would "
                f"use another interface than the one that reaches {host}; set {var}={interface} or unset it"
            )
    return lines, interface


def reachability(address: str, port: int) -> str:
    """A TCP connection to the rendezvous: open, refused (the host answers; nothing listens yet) or not reached."""
    try:
        with socket.create_connection((address, port), timeout=CONNECT_TIMEOUT_S):
            return "reachable, and something listens on the port (the rendezvous is up)"
    except ConnectionRefusedError:
        return "the host answers; nothing listens on the port yet (fine before the job starts)"
    except TimeoutError:
        return f"NOT reached: no answer within {CONNECT_TIMEOUT_S:.0f} s (a firewall, or the wrong address)"
    except OSError as e:
        what = {errno.EHOSTUNREACH: "no route to the host", errno.ENETUNREACH: "the network is unreachable"}
        return f"NOT reached: {what.get(e.errno, e.strerror)}"


def route_interface(address: str, port: int) -> str:
    """The local interface the kernel routes `address` through ('?' if unknown): the source address a UDP
    socket gets when connected to it (no packet is sent), looked up among the interfaces' addresses."""

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((address, port))
            source = s.getsockname()[0]
    except OSError:
        return "?"
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == source for a in addresses):
            return name
    return "?"


def interface_matches(spec: str, interface: str) -> bool:
    """NCCL's (and gloo's) interface list: comma-separated prefixes, '=' for exact names, '^' to exclude."""
    exclude = spec.startswith("^")
    names = spec.lstrip("^")
    exact = names.startswith("=")
    items = [n for n in names.lstrip("=").split(",") if n]
    hit = any(interface == n if exact else interface.startswith(n) for n in items)
    return not hit if exclude else hit


def free_port() -> int:
    """A TCP port free on this machine now, for a single-node rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
