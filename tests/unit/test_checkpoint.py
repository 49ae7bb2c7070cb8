"""Checkpoint discovery and integrity, and the non-finite-step guard."""

import math
import shutil

import pytest
import torch

from helpers import TINY, run_cli
from yoloscale.checkpoint import complete_checkpoints, find_checkpoint, folder
from yoloscale.errors import UserError


def _fake(run, name, complete=True):
    d = run / "checkpoints" / name
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"weights")
    if complete:
        folder.seal(d)  # manifest, then the marker
    return d


def test_latest_complete_checkpoint_wins(tmp_path):
    _fake(tmp_path, "step-00000010")
    newest = _fake(tmp_path, "step-00000020-end")
    _fake(tmp_path, "step-00000030", complete=False)  # killed while saving
    assert complete_checkpoints(tmp_path)[-1] == newest
    assert find_checkpoint(tmp_path) == newest
    # a kill between the two renames of a save leaves the complete copy under .tmp-: it counts
    switched_late = _fake(tmp_path, ".tmp-step-00000040")
    assert find_checkpoint(tmp_path) == switched_late


def test_incomplete_checkpoint_is_refused(tmp_path):
    with pytest.raises(UserError, match="incomplete"):
        find_checkpoint(_fake(tmp_path, "step-00000030", complete=False))


def test_every_checkpoint_damaged_is_a_clear_error(trained_run, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(trained_run, run)
    for ckpt in complete_checkpoints(run):
        model = ckpt / "model.safetensors"
        model.write_bytes(model.read_bytes()[:1000])  # truncated
    proc = run_cli("train", f"resume={run}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "every checkpoint" in proc.stderr and "is damaged" in proc.stderr and "Traceback" not in proc.stderr


def test_non_finite_steps_are_skipped_then_stop_the_run(tiny_data, tmp_path):
    from yoloscale.config import load_config
    from yoloscale.training.trainer import Trainer, TrainingDiverged

    cfg = load_config(None, [f"data={tiny_data}", *TINY, "max_bad_steps=2", "accumulate=1", f"project={tmp_path}"])
    trainer = Trainer(cfg)
    batch = next(iter(trainer.train_loader))
    good = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    before = [p.detach().clone() for p in trainer.raw_model.parameters()]
    batch["img"] = batch["img"].float() * math.nan  # NaN images -> NaN loss and gradients
    assert trainer.train_step(batch)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.raw_model.parameters()))  # weights untouched
    trainer._check_health()  # one bad step: below the limit
    assert trainer.health.skipped() == 1
    assert trainer.train_step(good)  # a good step resets the streak and moves the weights
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.raw_model.parameters()))
    for _ in range(2):
        bad = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in good.items()}
        bad["img"] = bad["img"].float() * math.nan
        trainer.train_step(bad)
    with pytest.raises(TrainingDiverged, match="2 consecutive optimizer steps"):
        trainer._check_health()


def test_a_skipped_step_is_counted_and_the_schedule_moves_on_as_in_ultralytics(tiny_data, tmp_path):
    """fp16 overflows and non-finite gradients skip the optimizer step and are counted; the schedule's position is
    the batch index, as in Ultralytics' trainer (whose GradScaler skips such a step the same way)."""
    from yoloscale.config import load_config
    from yoloscale.training.trainer import Trainer

    cfg = load_config(None, [f"data={tiny_data}", *TINY, "accumulate=1", f"project={tmp_path}"])
    trainer = Trainer(cfg)
    positions = []
    apply = trainer.schedule.apply
    trainer.schedule.apply = lambda optimizer, position, epoch: (
        positions.append(position),
        apply(optimizer, position, epoch),
    )
    prepare, calls = trainer.prepare_batch, []

    def first_batch_nan(batch):
        batch = prepare(batch)
        if not calls:
            batch["img"] = batch["img"] * math.nan
        calls.append(1)
        return batch

    trainer.prepare_batch = first_batch_nan
    trainer.train_epoch()
    trainer._check_health()
    assert trainer.health.skipped() == 1 and trainer.progress.optimizer_steps == 12
    assert positions == list(range(12))


def test_rotation_removes_only_what_the_writer_made(tmp_path):
    """The newest `keep` stay; older ones lose only their manifest's files; a user's copy, notes, a step-named
    folder the writer never sealed and a file of the user's inside an old checkpoint all stay."""
    root = tmp_path / "checkpoints"
    old, kept = _fake(tmp_path, "step-00000010-end"), _fake(tmp_path, "step-00000020-end")
    newest = _fake(tmp_path, "step-00000030-end")
    shutil.copytree(old, root / "my-safe-copy")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("keep me")
    (root / "readme.txt").write_text("mine")
    unsealed = root / "step-00000005"
    unsealed.mkdir()
    (unsealed / "mine.bin").write_bytes(b"x")
    leftover = _fake(tmp_path, ".tmp-step-00000040", complete=False)  # a save killed before its manifest
    (old / "my-note.txt").write_text("inside an old checkpoint")
    folder.rotate(root, keep=2)
    assert kept.is_dir() and newest.is_dir() and not leftover.exists()
    assert sorted(p.name for p in old.iterdir()) == ["my-note.txt"]  # only the user's file is left of it
    assert (root / "my-safe-copy" / folder.MARKER).is_file() and folder.verify(root / "my-safe-copy") is None
    assert (root / "notes" / "todo.txt").read_text() == "keep me" and (root / "readme.txt").is_file()
    assert (unsealed / "mine.bin").is_file()


def test_a_copy_of_a_checkpoint_survives_a_resumed_run(trained_run, tmp_path):
    """As a user does it: copy a checkpoint aside inside checkpoints/, add notes, resume for more epochs."""
    run = tmp_path / "r"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns(".lock"))
    first = complete_checkpoints(run)[0]
    shutil.copytree(first, run / "checkpoints" / "my-safe-copy")
    (run / "checkpoints" / "notes").mkdir()
    proc = run_cli("train", f"resume={run}", "epochs=10")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is not a checkpoint this run wrote: left in place" in proc.stderr
    assert folder.verify(run / "checkpoints" / "my-safe-copy") is None and (run / "checkpoints" / "notes").is_dir()
    assert not first.exists()  # rotated as before


def test_a_missing_checkpoint_folder_is_not_called_incomplete(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        find_checkpoint(tmp_path / "checkpoints" / "step-00000099")


def test_a_manifest_of_the_earlier_digest_still_verifies(tmp_path):
    """Manifests record XXH3-128 now; a checkpoint sealed with BLAKE2b (an earlier version) verifies, and damage
    to it is found."""
    import json

    ckpt = tmp_path / "checkpoints" / "step-00000005"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    folder.seal(ckpt)
    manifest = json.loads((ckpt / folder.MANIFEST).read_text())
    assert set(manifest["model.safetensors"]) == {"size", folder.DIGEST}
    older = {"model.safetensors": {"size": 7, "blake2b": folder._digest(ckpt / "model.safetensors", "blake2b")}}
    (ckpt / folder.MANIFEST).write_text(json.dumps(older))
    assert folder.verify(ckpt) is None
    (ckpt / "model.safetensors").write_bytes(b"weightz")
    assert "does not match its hash" in folder.verify(ckpt)
