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
import time
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

    def partition(self) -> None:
        """The link between the nodes goes down: every process lives on, and nothing crosses any more."""
        _ip("-n", self.ns[1], "link", "set", self.links[1], "down")

    def __exit__(self, *exc) -> None:
        for node in (0, 1):
            self.lose(node)
        for proc in self.procs:
            proc.wait()
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # removes the veth pair with it
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


# --- a Slurm cluster of the two nodes ---------------------------------------------------------------------------
def slurm_why_not() -> str | None:
    """Why a two-node Slurm cluster cannot run here (None: it can): the harness, Slurm's daemons and a running munged
    (.ci/slurm-up.sh starts one)."""
    reason = why_not()
    if reason:
        return reason
    missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munge", "unmunge") if not shutil.which(tool)]
    if missing:
        return f"Slurm or munge is missing: {', '.join(missing)}"
    token = subprocess.run(["munge", "-n"], capture_output=True)
    if token.returncode or subprocess.run(["unmunge"], input=token.stdout, capture_output=True).returncode:
        return "munged is not running (.ci/slurm-up.sh starts it)"
    return None


def _cgroup_mounts() -> str:
    """Shell commands that mount this machine's cgroup file systems again inside a node: `ip netns exec` mounts a
    fresh /sys, and slurmd will not start without them."""
    lines = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, path, kind, options, *_ = line.split()
        if not path.startswith("/sys/fs/cgroup"):
            continue
        if kind == "tmpfs" and path == "/sys/fs/cgroup":
            lines.insert(0, "mount -t tmpfs tmpfs /sys/fs/cgroup")
        elif kind in ("cgroup", "cgroup2"):
            lines.append(f"mkdir -p {path} && mount -t {kind} -o {options} {kind} {path}")
    return " && ".join(lines) or "true"


class SlurmOnTwoNodes:
    """`with SlurmOnTwoNodes(nodes, state_dir) as slurm:` a Slurm cluster of its own (its slurm.conf in `state_dir`,
    named by SLURM_CONF): slurmctld and one slurmd on node 0, one slurmd on node 1, each on its node's address; the
    machine's munged signs for both. `slurm.sbatch([...], cwd=..., env=...)` submits from node 0 and waits."""

    def __init__(self, nodes: TwoNodes, state: Path, cpus: int = 2) -> None:
        self.nodes, self.state, self.cpus = nodes, Path(state), cpus
        self.conf = self.state / "slurm.conf"
        self._logs: list = []  # the daemons' output files

    def env(self, base: dict | None = None) -> dict:
        return dict(base if base is not None else os.environ, SLURM_CONF=str(self.conf))

    def __enter__(self) -> SlurmOnTwoNodes:
        n, s = self.nodes, self.state
        for sub in ("ctld", *(f"d-{h}" for h in n.host)):
            (s / sub).mkdir(parents=True, exist_ok=True)
        node_lines = "".join(
            f"NodeName={h} NodeAddr={a} CPUs={self.cpus} RealMemory=2000 State=UNKNOWN\n"
            for h, a in zip(n.host, n.addr)
        )
        self.conf.write_text(
            f"ClusterName=ystwonodes\nSlurmctldHost={n.host[0]}({n.addr[0]})\nSlurmUser=root\nAuthType=auth/munge\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nSelectType=select/cons_tres\n"
            "SelectTypeParameters=CR_Core\nMpiDefault=none\nReturnToService=2\nJobRequeue=1\n"
            f"StateSaveLocation={s}/ctld\nSlurmdSpoolDir={s}/d-%n\nSlurmctldPidFile={s}/slurmctld.pid\n"
            f"SlurmdPidFile={s}/slurmd-%n.pid\nSlurmctldLogFile={s}/slurmctld.log\nSlurmdLogFile={s}/slurmd-%n.log\n"
            f"{node_lines}PartitionName=two Nodes={','.join(n.host)} Default=YES MaxTime=INFINITE State=UP\n"
        )
        env = self.env()
        daemons = [(0, "slurmctld -D -i"), *((i, f"slurmd -D -N {h}") for i, h in enumerate(n.host))]
        for node, command in daemons:
            log = open(s / f"{command.split()[0]}-{node}.out", "w")
            self._logs.append(log)
            n.popen(node, ["sh", "-c", f"{_cgroup_mounts()} && exec {command}"], env=env, stdout=log, stderr=log)
        for _ in range(120):
            states = self.run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split()
            if len(states) == 2 and all(state == "idle" for state in states):
                return self
            time.sleep(0.5)
        self.__exit__(None, None, None)
        tails = "".join(p.read_text()[-500:] for p in sorted(s.glob("*.out")) + sorted(s.glob("*.log")))
        raise RuntimeError(f"the two-node Slurm cluster did not come up:\n{tails}")

    def run(self, command: list[str], env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
        """A Slurm client command on node 0, with `env` (the environment a job inherits) and this cluster's conf."""
        return subprocess.run(
            ["ip", "netns", "exec", self.nodes.ns[0], *command],
            env=self.env(env),
            capture_output=True,
            text=True,
            **kwargs,
        )

    def sbatch(self, args: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        """sbatch --wait ARGS from node 0 in `cwd`; the job inherits `env`, as sbatch passes it on."""
        return self.run(["sbatch", "--wait", *args], env=env, cwd=cwd, timeout=timeout)

    def __exit__(self, *exc) -> None:
        self.run(["scancel", "-u", "root"])
        for node in (0, 1):  # the daemons and any job step left
            self.nodes.lose(node)
        for log in self._logs:
            log.close()
