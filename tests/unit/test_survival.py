"""What survives what: kills at every instant of the checkpoint protocol, damaged checkpoint files, two runs with
one name, a full disk, weights that do not fit, a data set too small for its accumulation. docs/training.md's table
names these tests."""

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import TINY, run_cli
from yoloscale.checkpoint import complete_checkpoints, find_checkpoint, folder

pytestmark = pytest.mark.slow
# Deterministic end to end (no augmentation draws, no loader processes), one thread: resumes can be bit-identical.
PLAIN = [*TINY, "mosaic=0", "val=False", "epochs=2", "save_steps=5"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _train(*args, fault: str = "", check: bool = True) -> subprocess.CompletedProcess:
    env = dict(ENV, YOLOSCALE_FAULT=fault) if fault else ENV
    proc = subprocess.run([sys.executable, "-m", "yoloscale", "train", *args], env=env, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _weights(run):
    return load_file(str(run / "weights" / "last.safetensors"))


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    """The uninterrupted run every interrupted one must end equal to."""
    project = tmp_path_factory.mktemp("straight")
    _train(f"data={tiny_data}", *PLAIN, f"project={project}", "name=s")
    return project / "s"


@pytest.mark.parametrize("point", [p for p in folder.FAULT_POINTS if p != "aside"])  # aside: the test below
def test_a_kill_at_any_instant_of_a_save_then_resume_ends_identical(point, straight, tiny_data, tmp_path):
    """The second save (step 10) dies at `point` (all files written, the manifest, the marker, the switch, the
    rotation); resume=auto continues from what is complete and ends bit-identical. (A save is never of a step that
    already has a folder in a plain run; that case, a kill between its two renames, is the next test.)"""
    killed = _train(f"data={tiny_data}", *PLAIN, f"project={tmp_path}", "name=k", fault=f"{point}@2", check=False)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert complete_checkpoints(tmp_path / "k")  # the first save (step 5) at least
    _train("resume=auto", f"project={tmp_path}", "name=k")
    _same(_weights(straight), _weights(tmp_path / "k"))


def test_an_interrupted_run_leaves_last_and_best_pt_that_ultralytics_loads(tiny_data, tmp_path):
    """As Ultralytics' trainer: weights/last.pt after every epoch and best.pt when the fitness improves, so a run
    killed in its second epoch's save has the first epoch's weights to open (the final files are not there)."""
    from ultralytics import YOLO

    killed = _train(f"data={tiny_data}", *TINY, f"project={tmp_path}", "name=k", fault="written@2", check=False)
    assert killed.returncode == 137, killed.stderr[-2000:]
    weights = tmp_path / "k" / "weights"
    assert not (weights / "last.safetensors").exists()
    for name in ("last.pt", "best.pt"):
        assert YOLO(str(weights / name)).names == {0: "rectangle", 1: "ellipse", 2: "triangle"}


def test_a_kill_between_the_renames_of_a_resave_keeps_a_complete_copy(tmp_path):
    """Saving a step that exists moves the old folder aside before the switch: killed in between, both copies are
    complete, the newer is resumed from, and the next save renames it into place."""
    root = tmp_path / "checkpoints"
    old = root / "step-00000010"
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"old")
    folder.seal(old)
    script = f"""
from pathlib import Path
from yoloscale.checkpoint import folder
tmp = Path({str(root)!r}) / ".tmp-step-00000010"
tmp.mkdir()
(tmp / "model.safetensors").write_bytes(b"new")
folder.seal(tmp)
folder.switch(tmp, Path({str(root)!r}) / "step-00000010")
"""
    proc = subprocess.run([sys.executable, "-c", script], env=dict(ENV, YOLOSCALE_FAULT="aside"))
    assert proc.returncode == 137
    assert sorted(p.name for p in root.iterdir()) == [".old-step-00000010", ".tmp-step-00000010"]
    chosen = find_checkpoint(tmp_path)
    assert (chosen / "model.safetensors").read_bytes() == b"new"
    folder.repair(root)
    assert (root / "step-00000010" / "model.safetensors").read_bytes() == b"new"


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory):
    """A finished run of 3 epochs with its last two checkpoints (epochs 2 and 3)."""
    project = tmp_path_factory.mktemp("finished")
    _train(f"data={tiny_data}", *TINY, "mosaic=0", "val=False", "epochs=3", f"project={project}", "name=f")
    return project / "f"


def _damage(target, how: str) -> None:
    data = target.read_bytes()
    if how == "flip":
        middle = len(data) // 2
        target.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    elif how == "truncate":
        target.write_bytes(data[: len(data) // 2])
    else:
        target.unlink()


def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(finished, tmp_path):
    """A flipped byte in each file of the newest checkpoint in turn, a truncated RNG state, a deleted EMA: resume
    names the damaged checkpoint and continues from the older one, retraining the last epoch to the same weights."""
    newest = complete_checkpoints(finished)[-1]
    files = sorted(p.name for p in newest.iterdir() if p.is_file() and p.name != folder.MARKER)
    cases = [("flip", f) for f in files] + [("truncate", "random_states_0.pkl"), ("delete", "ema.safetensors")]
    for how, name in cases:
        run = tmp_path / f"{how}-{name}"
        shutil.copytree(finished, run)
        _damage(complete_checkpoints(run)[-1] / name, how)
        proc = _train(f"resume={run}")
        assert f"checkpoint '{complete_checkpoints(run)[-1]}' is damaged" in proc.stderr, (
            how,
            name,
            proc.stderr[-1500:],
        )
        _same(_weights(finished), _weights(run))


def test_two_runs_with_one_name_cannot_collide(tiny_data, tmp_path):
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "yoloscale",
            "train",
            f"data={tiny_data}",
            *TINY,
            "epochs=50",
            f"project={tmp_path}",
            "name=same",
        ],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (tmp_path / "same" / ".lock").exists() and time.time() < deadline:
            time.sleep(0.05)
        # exist_ok: that folder or nothing (without it, the run would take the next free name, same2)
        second = run_cli("train", f"data={tiny_data}", *TINY, f"project={tmp_path}", "name=same", "exist_ok=True")
        assert second.returncode == 2 and "is in use by process" in second.stderr, second.stderr[-1500:]
        while not (tmp_path / "same" / "results.csv").exists() and time.time() < deadline:
            time.sleep(0.05)
        # once the live run has written results, a second one is still told that it is in use
        third = run_cli("train", f"data={tiny_data}", *TINY, f"project={tmp_path}", "name=same", "exist_ok=True")
        assert third.returncode == 2 and "is in use by process" in third.stderr, third.stderr[-1500:]
        resumed = run_cli("train", "resume=auto", f"project={tmp_path}", "name=same")
        assert resumed.returncode == 2 and ("in use" in resumed.stderr or "no complete checkpoint" in resumed.stderr)
    finally:
        first.kill()
        first.wait()
    outside = run_cli("train", f"project={tmp_path}", "name=../../escaped")
    assert outside.returncode == 2 and "key 'name' must be a folder inside project" in outside.stderr


def _mount_tmpfs(path, size_mb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_survives(trained_run, tiny_data, tmp_path):
    per_checkpoint = folder.size_of(complete_checkpoints(trained_run)[-1])
    disk = tmp_path / "small"
    if not _mount_tmpfs(disk, int(1.6 * per_checkpoint / 2**20) + 2):
        pytest.skip("needs root and a tmpfs mount (here: not permitted)")
    try:
        proc = run_cli("train", f"data={tiny_data}", *TINY, "val=False", "plots=False", f"project={disk}", "name=d")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "no space left on the device" in proc.stderr and "Traceback" not in proc.stderr
        assert not any(p.name.startswith(".tmp-") for p in (disk / "d" / "checkpoints").iterdir())
        assert folder.verify(find_checkpoint(disk / "d")) is None  # the first checkpoint is intact
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        ro = run_cli("train", f"data={tiny_data}", *TINY, f"project={disk}", "name=other")
        assert ro.returncode == 2 and "Read-only file system" in ro.stderr and "Traceback" not in ro.stderr
    finally:
        subprocess.run(["umount", str(disk)])


def test_weights_that_do_not_fit_are_refused_and_a_new_class_count_is_named(trained_run, tiny_data, tmp_path):
    base = [f"data={tiny_data}", *TINY, "epochs=1", "val=False", f"project={tmp_path}"]
    good = load_file(str(trained_run / "weights" / "last.safetensors"))
    save_file({"unrelated.weight": torch.zeros(3)}, str(tmp_path / "none.safetensors"))
    proc = run_cli("train", *base, "name=a", f"weights={tmp_path / 'none.safetensors'}")
    assert proc.returncode == 2 and "none of its 1 tensors matches" in proc.stderr
    wrong = dict(good, **{"model.0.conv.weight": torch.zeros(5, 3, 3, 3)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    proc = run_cli("train", *base, "name=b", f"weights={tmp_path / 'wrong.safetensors'}")
    assert proc.returncode == 2 and "'model.0.conv.weight' has shape (5, 3, 3, 3)" in proc.stderr
    head = {
        k: (torch.zeros(5, *v.shape[1:]) if ".cv3." in k and k.endswith(("2.weight", "2.bias")) else v)
        for k, v in good.items()
    }
    save_file(head, str(tmp_path / "head.safetensors"))
    proc = run_cli("train", *base, "name=c", f"weights={tmp_path / 'head.safetensors'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the file has 5 classes, the data 3: the class outputs start anew" in proc.stdout + proc.stderr
    torch.save({"model": {"not": "a model"}, "hook": os.getcwd}, tmp_path / "evil.pt")  # needs more than weights
    proc = run_cli("train", *base, "name=d", f"weights={tmp_path / 'evil.pt'}")
    assert proc.returncode == 2 and "trust_pickle=True" in proc.stderr and "Traceback" not in proc.stderr


def test_a_model_pt_fine_tunes_with_its_weights(trained_run, tiny_data, tmp_path):
    """model=*.pt: Ultralytics' own way to fine-tune, read weights-only (our best.pt is an Ultralytics checkpoint)."""
    proc = run_cli(
        "train",
        f"data={tiny_data}",
        *TINY,
        f"model={trained_run / 'weights' / 'best.pt'}",
        "epochs=1",
        f"project={tmp_path}",
        "name=ft",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tensors loaded" in proc.stdout + proc.stderr


def test_a_data_set_smaller_than_its_accumulation_still_steps_every_epoch(tiny_data, tmp_path):
    from yoloscale.config import load_config
    from yoloscale.training.trainer import Trainer

    cfg = load_config(
        None,
        [
            f"data={tiny_data}",
            *TINY,
            "batch=4",
            "nbs=256",
            "warmup_epochs=0",
            "epochs=2",
            "val=False",
            f"project={tmp_path}",
        ],
    )
    trainer = Trainer(cfg)
    assert trainer.schedule.accumulate == len(trainer.train_loader) == 24  # 64 would leave epochs without a step
    trainer.train()
    assert trainer.progress.optimizer_steps == 2
