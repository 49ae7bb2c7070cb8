"""The writer thread that seals checkpoints and exports weights while training goes on: jobs run in order on their
own thread, an error reaches the training thread at its next wait, a checkpoint is complete only once its seal ran.
(Kills at every point of a background seal: test_survival.py.)"""

import errno
import threading

import pytest
import torch
from accelerate import Accelerator

from yoloscale.checkpoint import MARKER, complete_checkpoints, save_checkpoint, wait_for_writer
from yoloscale.checkpoint import folder as ckpt_folder
from yoloscale.checkpoint.background import BackgroundWriter
from yoloscale.errors import UserError


def test_jobs_run_in_order_on_their_own_thread():
    writer, seen = BackgroundWriter(), []
    for i in range(5):
        writer.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
    writer.wait()
    writer.close()
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert {name for _, name in seen} == {"yoloscale-writer"}


def test_an_error_reaches_the_next_wait_and_skips_the_jobs_after_it():
    writer, ran = BackgroundWriter(), []

    def fail():
        raise UserError("disk full")

    writer.submit(fail)
    writer.submit(lambda: ran.append("after"))  # a seal after a failed one never runs
    with pytest.raises(UserError, match="disk full"):
        writer.wait()
    assert ran == []
    writer.submit(lambda: ran.append("next"))  # the error was handed over: the writer goes on
    writer.wait()
    writer.close()
    assert ran == ["next"]


@pytest.fixture
def accelerator():
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return acc


def test_a_checkpoint_is_complete_only_after_its_background_seal(accelerator, tmp_path):
    writer, release = BackgroundWriter(), threading.Event()
    writer.submit(release.wait)  # the writer is busy: the seal queues behind this job
    final = save_checkpoint(accelerator, tmp_path, 5, {}, writer=writer)
    assert not (final / MARKER).exists() and (final.parent / f".tmp-{final.name}").is_dir()
    assert complete_checkpoints(tmp_path) == []
    release.set()
    wait_for_writer(accelerator, writer)
    writer.close()
    assert complete_checkpoints(tmp_path) == [final] and ckpt_folder.verify(final) is None


def test_a_full_disk_in_the_background_seal_is_one_line_at_the_next_wait(accelerator, tmp_path, monkeypatch):
    writer = BackgroundWriter()
    first = save_checkpoint(accelerator, tmp_path, 5, {}, writer=writer)
    wait_for_writer(accelerator, writer)

    def full(folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_folder, "seal", full)
    save_checkpoint(accelerator, tmp_path, 10, {}, writer=writer)
    with pytest.raises(UserError, match=f"no space left .* '{first.name}', is intact") as e:
        wait_for_writer(accelerator, writer)
    writer.close()
    assert "\n" not in str(e.value)
    assert complete_checkpoints(tmp_path) == [first]
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000010").exists()
