"""The slow, host-only half of saving, off the training thread.

A checkpoint's files are written by every rank on the training thread (Accelerate's save_state is collective under
sharding). What follows on the main rank needs no collective and no GPU: fsync and hash every file, the manifest,
the marker, the rename into place, the rotation (folder.py); and the exports of weights/ (training/export.py). Those run
here, on one thread, in the order they were handed over, while the next steps train. The training thread waits for
them where it must: before it changes what a job reads (the eval model, at the next epoch's end), before a stop
signal's save is announced, and before the run ends or its directory is unlocked. An error in a job (a full disk)
is raised on the training thread at that wait, as the synchronous save raised it.

A kill while a job runs is a kill at that instant of the checkpoint protocol: the folder without its marker is a
leftover, the previous checkpoint stays complete (tests/unit/test_survival.py kills the jobs at every point).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

Job = Callable[[], None]


class BackgroundWriter:
    """One worker thread running jobs in order. `submit(job)` returns at once; `wait()` returns when every job
    handed over so far has run, and raises the first error one of them raised (the jobs after it are skipped:
    a checkpoint is never sealed after an earlier one failed)."""

    def __init__(self, name: str = "yoloscale-writer"):
        self._name = name
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def submit(self, job: Job) -> None:
        if self._thread is None:
            # A daemon: a trainer used without train() (which closes the writer in its `finally`) must not keep the
            # interpreter from exiting; a seal cut short at exit leaves the previous checkpoint complete.
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def wait(self) -> None:
        """Block until every submitted job has run; raise the first error since the last wait."""
        self._jobs.join()
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Wait for the jobs, then end the thread (errors are left to `wait`)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                with self._lock:
                    failed = self._error is not None
                if not failed:
                    job()
            except BaseException as e:  # handed to the training thread at its next wait
                with self._lock:
                    self._error = e
            finally:
                self._jobs.task_done()
        self._jobs.task_done()
