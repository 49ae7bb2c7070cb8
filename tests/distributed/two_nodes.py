"""Two nodes on one machine, for the multi-node tests: two Linux network namespaces joined by a veth pair, each with
its own address and host name, the two names resolving to the two addresses inside them (`ip netns exec` mounts
/etc/netns/NAME/hosts over /etc/hosts). Commands run in a node through `ip netns exec` and a UTS namespace of
their own; the file system is shared, as on a cluster. No address leaves the namespaces, and everything is removed
on exit. Needs root and iproute2: `why_not()` says why not, for a skip."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

NETNS_ETC = Path("/etc/netns")


def why_not() -> str | None:
    """Why the harness cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("unshare"):
        return "iproute2's ip or util-linux's unshare is missing"
    probe = f"ysprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe])
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class TwoNodes:
    """`with TwoNodes() as nodes:` then `nodes.popen(0, [...])`; nodes.host[i] / nodes.addr[i] name node i."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}"
        self.ns = [f"ys{tag}n0", f"ys{tag}n1"]
        self.host = [f"ysnode0-{tag}", f"ysnode1-{tag}"]
        subnet = 10 + os.getpid() % 200
        self.addr = [f"10.231.{subnet}.1", f"10.231.{subnet}.2"]
        self.links = [f"ys{tag}v0", f"ys{tag}v1"]
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> TwoNodes:
        try:
            for ns in self.ns:
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip(
                "link",
                "add",
                self.links[0],
                "netns",
                self.ns[0],
                "type",
                "veth",
                "peer",
                "name",
                self.links[1],
                "netns",
                self.ns[1],
            )
            hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for a, h in zip(self.addr, self.host))
            for ns, link, addr in zip(self.ns, self.links, self.addr):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", link)
                _ip("-n", ns, "link", "set", link, "up")
                (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
                (NETNS_ETC / ns / "hosts").write_text(hosts)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def popen(self, node: int, command: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
        """`command` on node `node` (its own process group, so it can be killed whole)."""
        wrapped = [
            "ip",
            "netns",
            "exec",
            self.ns[node],
            "unshare",
            "--uts",
            "sh",
            "-c",
            f'hostname {self.host[node]} && exec "$@"',
            "sh",
            *command,
        ]
        proc = subprocess.Popen(wrapped, env=env, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def lose(self, node: int) -> None:
        """kill -9 of every process in the node's network namespace (its launcher agent and the workers the agent
        started in sessions of their own): the node is lost."""
        pids = subprocess.run(["ip", "netns", "pids", self.ns[node]], capture_output=True, text=True).stdout.split()
        for pid in map(int, pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __exit__(self, *exc) -> None:
        for node in (0, 1):
            self.lose(node)
        for proc in self.procs:
            proc.wait()
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # removes the veth pair with it
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
