"""Every process of a job shows that it is alive; a frozen or lost one ends the job within `heartbeat_s`, by name.

A collective waits for every rank, so one frozen rank (stopped, hung in a driver, its node gone) holds the others
until the process group's timeout. Each rank therefore bumps a counter of its own in the job's rendezvous store
(torch's TCPStore at MASTER_ADDR:MASTER_PORT, which torchrun, Accelerate, DeepSpeed's launcher and our Slurm set-up
all provide) from a daemon thread, several times per `heartbeat_s`. Rank 0 watches every other rank's counter and the
others watch rank 0's: a counter that has not moved for `heartbeat_s` seconds, or a store that stops answering, ends
the watching process with one line naming the silent rank, and the launcher then stops the rest of the job. Only the
local clock is read (no clock agreement between nodes is needed).

`main_first()` is Accelerate's main_process_first (the main rank writes Ultralytics' label caches, then the others
read them) without a collective: the waiting ranks poll the store, so a long first pass (label caches, cache=ram of
a large set) is not cut short by the collective timeout, while a frozen main rank still ends the job.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

from torch.distributed import TCPStore

POLL_S = 0.2  # how often a waiting rank looks at the store


class Heartbeat:
    def __init__(self, rank: int, world: int, limit_s: float, tag: str):
        self.rank, self.world, self.limit, self.tag = rank, world, float(limit_s), tag
        self.store = None
        self._stop = threading.Event()

    @property
    def active(self) -> bool:
        return self.store is not None

    def start(self) -> Heartbeat:
        """Connect to the job's store and start beating and watching (several processes and heartbeat_s > 0)."""
        if self.world <= 1 or self.limit <= 0 or "MASTER_ADDR" not in os.environ:
            return self

        self.store = TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=max(self.limit / 2, 2.0)),
            wait_for_workers=False,
        )
        self._answered_at = time.monotonic()
        self._every = min(max(self.limit / 6, 0.5), 10.0)  # several beats and checks per heartbeat_s
        threading.Thread(target=self._run, name="yoloscale-heartbeat", daemon=True).start()
        threading.Thread(target=self._watch_store, name="yoloscale-store-watch", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _key(self, name: str) -> str:
        return f"yoloscale/{self.tag}/{name}"

    def _run(self) -> None:
        every = self._every
        watched = range(1, self.world) if self.rank == 0 else [0]
        seen: dict[int, tuple[int, float]] = {}
        unanswered_since: float | None = None
        while not self._stop.wait(every):
            now = time.monotonic()
            try:
                self.store.add(self._key(f"beat/{self.rank}"), 1)
                for r in watched:
                    value = self.store.add(self._key(f"beat/{r}"), 0)  # adding 0: a read that never blocks
                    if r not in seen or seen[r][0] != value:
                        seen[r] = (value, now)
                    elif now - seen[r][1] > self.limit:
                        self._end(f"rank {r} has shown no sign of life for {now - seen[r][1]:.0f} s")
                unanswered_since = None
                self._answered_at = time.monotonic()
            except Exception:  # the store's host (rank 0, or the launcher) does not answer
                unanswered_since = unanswered_since or now
                if now - unanswered_since > self.limit:
                    self._end(
                        "the job's rendezvous store (rank 0 or the launcher) has not answered for "
                        f"{now - unanswered_since:.0f} s"
                    )

    def _watch_store(self) -> None:
        """A store call that never returns (its host's node cut off: TCP retransmits for many minutes instead of
        failing) stalls the beating thread itself, so another thread times it."""
        while not self._stop.wait(self._every):
            silent = time.monotonic() - self._answered_at
            if silent > self.limit + self._every:
                self._end(f"the job's rendezvous store (rank 0 or the launcher) has not answered for {silent:.0f} s")

    def _end(self, what: str) -> None:
        print(
            f"yoloscale: error: {what} (frozen, stopped or its node lost); rank {self.rank} ends so that the job "
            f"stops (heartbeat_s={self.limit:g}).",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    @contextlib.contextmanager
    def main_first(self, accelerator, what: str) -> Iterator[None]:
        """The main rank runs the block first, then the others; all leave together."""
        if not self.active:
            with accelerator.main_process_first():
                yield
            return
        if self.rank != 0:
            self._wait_until(self._key(f"{what}/main"), 1)
        yield
        if self.rank == 0:
            self.store.add(self._key(f"{what}/main"), 1)
        self.store.add(self._key(f"{what}/done"), 1)
        self._wait_until(self._key(f"{what}/done"), self.world)

    def _wait_until(self, key: str, count: int) -> None:
        while self.store.add(key, 0) < count:
            time.sleep(POLL_S)


# What torch's transports say when a peer process went away (its node lost, killed, crashed): gloo's TCP pairs,
# NCCL's watchdog, the store's socket. Such an error ends this process with one line instead of a traceback.
_PEER_GONE = (
    "gloo/transport",
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
    "ProcessGroupNCCL's watchdog",
    "failed to recv, got 0 bytes",
)


def lost_peer(error: BaseException) -> str | None:
    """The one line for an error that says another process of the job is gone, else None."""
    text = str(error)
    if not any(marker in text for marker in _PEER_GONE):
        return None
    reason = text.strip().splitlines()[0]
    reason = reason.split("] ", 1)[-1] if reason.startswith("[") else reason  # gloo's "[file.cc:545] " prefix
    reason = reason.split(" This is typically", 1)[0].rstrip(". ")
    return (
        f"lost contact with another process of the job ({reason}): it stopped, or its node was lost. The same "
        "command with resume=auto continues from the last complete checkpoint."
    )
