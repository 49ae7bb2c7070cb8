"""End to end on a tiny model: it learns, its results open in Ultralytics, and a killed run resumes exactly."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY, run_cli
from yoloscale.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture
def run(trained_run):
    return trained_run


def _rows(run):
    with open(run / "results.csv") as f:
        return list(csv.DictReader(f))


def test_loss_falls_and_map_rises(run):
    rows = _rows(run)
    assert len(rows) == 8
    total = [sum(float(r[f"train/{k}"]) for k in ("box_loss", "cls_loss", "dfl_loss")) for r in rows]
    assert total[-1] < 0.7 * total[0]
    assert float(rows[-1]["metrics/mAP50(B)"]) > 0.5  # the synthetic set is learnable within a few CPU epochs
    assert float(rows[-1]["metrics/mAP50-95(B)"]) > 0.2


def test_run_directory(run):
    from yoloscale.config import load_config

    assert load_config(run / "config.yaml").epochs == 8
    ckpts = sorted((run / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == [
        "step-00000084-end",
        "step-00000096-end",
    ]  # 8 epochs x 12 steps; the newest 2 kept
    assert {p.name for p in (run / "weights").iterdir()} >= {
        "best.pt",
        "last.pt",
        "best.safetensors",
        "last.safetensors",
    }


def test_ultralytics_opens_predicts_and_agrees_on_map(run, tiny_data):
    from ultralytics import YOLO

    model = YOLO(str(run / "weights" / "last.pt"))
    result = model.predict(str(tiny_data.parent / "images/val/000000.png"), imgsz=96, device="cpu", verbose=False)
    assert len(result[0].boxes) > 0
    metrics = model.val(data=str(tiny_data), imgsz=96, batch=16, device="cpu", plots=False, verbose=False)
    ours = float(_rows(run)[-1]["metrics/mAP50-95(B)"])
    assert metrics.box.map == pytest.approx(ours, abs=0.01)  # fp16 weights and fused BN in the .pt: tiny drift
    assert YOLO(str(run / "weights" / "best.pt")).predict(result[0].orig_img, imgsz=96, verbose=False)


def test_export_command_rewrites_the_pt_files(run):
    for pt in (run / "weights").glob("*.pt"):
        pt.unlink()
    assert main(["export", str(run)]) == 0
    from ultralytics import YOLO

    assert YOLO(str(run / "weights" / "last.pt")).names == {0: "rectangle", 1: "ellipse", 2: "triangle"}


def test_export_to_another_format_goes_through_ultralytics_exporter(run, capsys):
    """format= (Ultralytics' key): best.pt through Ultralytics' own exporter, at the run's image size; a format it
    does not have, or one whose package is missing (installs are off), is one line."""
    import torch

    assert main(["export", str(run), "format=torchscript"]) == 0
    exported = run / "weights" / "best.torchscript"
    assert exported.is_file() and f"wrote {exported}" in capsys.readouterr().out
    torch.jit.load(str(exported))
    assert main(["export", str(run), "format=pdf"]) == 2
    assert "is not one of Ultralytics' formats" in capsys.readouterr().err


def test_resume_after_sigkill_continues_exactly(tiny_data, tmp_path):
    """A run killed mid-epoch resumes from its last complete checkpoint and ends bit-identical to an
    uninterrupted run: same data position, step, LR, optimizer state, EMA and RNG."""
    args = [f"data={tiny_data}", *TINY, "epochs=2", "save_steps=5", "val=False", "mosaic=0", f"project={tmp_path}"]
    # All three runs in fresh processes with one thread count: Ultralytics sets OMP_NUM_THREADS=1 when imported,
    # and fp32 CPU kernels sum in a different order with a different number of threads.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "yoloscale", "train"]
    subprocess.run([*cmd, *args, "name=straight"], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([*cmd, *args, "name=killed"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "checkpoints" / "step-00000005"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (tmp_path / "killed" / "weights" / "last.safetensors").exists()
    subprocess.run(
        [*cmd, "resume=auto", f"project={tmp_path}", "name=killed"], env=env, check=True, capture_output=True
    )
    a = load_file(str(tmp_path / "straight/weights/last.safetensors"))
    b = load_file(str(tmp_path / "killed/weights/last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # the resumed epoch's metrics row covers the whole epoch (its loss sums were in the checkpoint)
    assert _rows(tmp_path / "killed")[0]["train/box_loss"] == _rows(tmp_path / "straight")[0]["train/box_loss"]
    last_a = sorted((tmp_path / "straight/checkpoints").iterdir())[-1].name
    last_b = sorted((tmp_path / "killed/checkpoints").iterdir())[-1].name
    assert last_a == last_b == "step-00000024-end"


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("train", "resume=auto", f"project={tmp_path}", "name=empty")
    assert proc.returncode == 2 and "holds no complete checkpoint" in proc.stderr


def test_wandb_offline_needs_no_key_and_records_no_environment(tiny_data, tmp_path):
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(MY_SECRET_TOKEN="hunter2-do-not-log")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "yoloscale",
            "train",
            f"data={tiny_data}",
            *TINY,
            "epochs=1",
            "wandb=offline",
            f"project={tmp_path}",
            "name=w",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = [p for p in (tmp_path / "w" / "wandb").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)  # the offline run was recorded
    for p in files:
        assert b"hunter2-do-not-log" not in p.read_bytes(), p


def test_sigusr1_saves_a_checkpoint_and_stops_then_the_run_resumes(tiny_data, tmp_path):
    """Slurm's pre-timeout signal: the run checkpoints at its next logging interval, exits 0, and resumes."""
    args = [f"data={tiny_data}", *TINY, "epochs=3", "log_interval=1", "val=False", f"project={tmp_path}", "name=p"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "yoloscale", "train", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = tmp_path / "p"
    deadline = time.time() + 120
    while not (run / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(2)  # into the first epoch
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stop signal received: checkpoint" in err
    import json

    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]  # the stop's, after the epoch ends before it
    assert not ckpt.name.endswith("-end")
    state = json.loads((ckpt / "trainer_state.json").read_text())["progress"]
    assert state["optimizer_steps"] > 0 and state["epoch"] < 3
    assert not (run / "weights" / "last.safetensors").exists()  # stopped, not finished: no final weights
    assert main(["train", f"resume={run}"]) == 0
    assert (run / "weights" / "last.safetensors").exists() and (run / "weights" / "last.pt").exists()
    assert sorted((run / "checkpoints").glob("step-*"))[-1].name == "step-00000036-end"  # 3 epochs x 12 steps


def test_export_without_ema_consolidates_the_checkpoint(tiny_data, tmp_path):
    """ema=False and a run that never reached its end (no weights/*.safetensors): `yoloscale export` takes the model
    weights of the latest checkpoint (whatever layout its backend wrote: backend/full_state.read_weights, checked
    for FSDP2 and ZeRO in test_full_state.py) into weights/last.safetensors and an Ultralytics last.pt."""
    import shutil

    import torch
    from safetensors.torch import load_file
    from ultralytics import YOLO

    args = [f"data={tiny_data}", *TINY, "epochs=1", "val=False", "ema=False", f"project={tmp_path}", "name=noema"]
    assert main(["train", *args]) == 0
    run = tmp_path / "noema"
    shutil.rmtree(run / "weights")  # as if killed before the end
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert not (ckpt / "ema.safetensors").exists()
    assert main(["export", str(run)]) == 0
    saved = load_file(str(ckpt / "model.safetensors"))
    exported = load_file(str(run / "weights" / "last.safetensors"))
    assert exported.keys() == {k.removeprefix("module.") for k in saved}
    assert all(torch.equal(exported[k.removeprefix("module.")], v) for k, v in saved.items())
    pt = YOLO(str(run / "weights" / "last.pt")).model.state_dict()
    torch.testing.assert_close(pt["model.0.conv.weight"].float(), exported["model.0.conv.weight"], rtol=1e-3, atol=1e-3)


def test_fraction_and_single_cls_mean_what_they_mean_in_ultralytics(tiny_data, tmp_path):
    """fraction=0.5 trains on half the train images; single_cls=True trains one class named 'item', down to the
    Ultralytics .pt; bgr and copy_paste_mode reach Ultralytics' augmentation; deterministic as in Ultralytics;
    cls_pw and multi_scale train (their arithmetic: test_batch_parity.py)."""
    from ultralytics import YOLO

    from yoloscale.config import load_config
    from yoloscale.training.trainer import Trainer

    args = [f"data={tiny_data}", *TINY, "epochs=1", f"project={tmp_path}"]
    full = Trainer(load_config(None, [*args, "name=full", "deterministic=False"]))
    assert not torch.are_deterministic_algorithms_enabled()
    half = Trainer(
        load_config(
            None, [*args, "name=half", "fraction=0.5", "single_cls=True", "bgr=0.3", "cls_pw=0.5", "multi_scale=0.5"]
        )
    )
    assert half.criterion.class_weights.shape == (1, 1, 1)  # Ultralytics' loss got cls_pw's weights
    # Ultralytics' deterministic=True (its default): torch's deterministic algorithms, warning where an op has none
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert len(half.train_set) == round(len(full.train_set) * 0.5)
    assert half.args.bgr == 0.3 and half.args.copy_paste_mode == "flip" and half.data["nc"] == 1
    half.train()
    assert YOLO(str(tmp_path / "half" / "weights" / "last.pt")).names == {0: "item"}


def test_time_ends_the_run_once_spent_and_stretches_the_schedule_to_the_epochs_it_allows(tiny_data, tmp_path):
    """Ultralytics' time= (hours): a budget spent at the first logging interval ends that epoch there, validated and
    saved as the final one; a resume of the finished run trains nothing more."""
    from yoloscale.config import load_config
    from yoloscale.training.trainer import Trainer

    args = [f"data={tiny_data}", *TINY, "epochs=5", "log_interval=1", f"project={tmp_path}", "name=t"]
    trainer = Trainer(load_config(None, [*args, "time=1e-9"]))  # 3.6 microseconds
    trainer.train()
    rows = _rows(tmp_path / "t")
    assert len(rows) == 1 and rows[0]["metrics/mAP50(B)"] != ""
    assert trainer.progress.early_stopped and trainer.clock.seconds > 0
    assert (tmp_path / "t" / "weights" / "best.pt").exists()
    from yoloscale.commands.train import train_config

    again = Trainer(train_config(["resume=auto", f"project={tmp_path}", "name=t"]))
    steps = again.progress.optimizer_steps
    again.train()
    assert again.progress.optimizer_steps == steps and len(_rows(tmp_path / "t")) == 1


def test_time_re_estimates_the_epochs_from_the_mean_epoch_time():
    from yoloscale.training.state import TrainingTime

    clock = TrainingTime(hours=0.5, epochs=100)
    clock.end_epoch(seconds=100.0, epochs_done=2)  # 50 s an epoch: 1,800 s hold 36
    assert clock.epochs == 36 and not clock.is_up(1799.0) and clock.is_up(1800.0)
    resumed = TrainingTime(hours=0.5, epochs=100)
    resumed.load_state_dict(clock.state_dict())
    assert (resumed.seconds, resumed.epochs) == (100.0, 36)
    plain = TrainingTime(hours=0, epochs=7)
    plain.load_state_dict(clock.state_dict())
    assert plain.epochs == 7 and not plain.is_up(1e9)  # without time=, epochs= decides


def test_freeze_keeps_the_named_layers_at_their_initial_weights(tiny_data, tmp_path):
    """Ultralytics' freeze=: freeze=2 (the first two layers) and freeze=[4,9.cv1] (a layer and a module)."""
    from yoloscale.config import load_config
    from yoloscale.errors import UserError
    from yoloscale.training.trainer import Trainer

    args = [f"data={tiny_data}", *TINY, "epochs=1", "ema=False", f"project={tmp_path}"]
    for freeze, frozen, trained in (
        ("2", ("model.0.", "model.1."), "model.2."),
        ("[4,9.cv1]", ("model.4.", "model.9.cv1."), "model.9.cv2."),
    ):
        trainer = Trainer(load_config(None, [*args, f"name=f{len(freeze)}", f"freeze={freeze}"]))
        before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
        trainer.train()
        after = trainer.raw_model.state_dict()
        changed = {k for k in before if k.endswith(".weight") and not torch.equal(before[k], after[k])}
        assert changed and not any(k.startswith(frozen) for k in changed)
        assert any(k.startswith(trained) for k in changed)
    with pytest.raises(UserError, match="freezes every parameter"):
        Trainer(load_config(None, [*args, "name=all", "freeze=100"]))
    with pytest.raises(UserError, match="key 'freeze' takes"):
        load_config(None, ["freeze=first"])


def test_rect_trains_on_batches_of_one_shape_each(tiny_data, tmp_path):
    """Ultralytics' rect=: images of two aspect ratios, grouped into batches of one (non-square) shape each."""
    import shutil

    import cv2

    from yoloscale.config import load_config
    from yoloscale.training.trainer import Trainer

    root = tmp_path / "shapes"
    shutil.copytree(tiny_data.parent, root, ignore=shutil.ignore_patterns("*.cache"))
    (root / "data.yaml").write_text((root / "data.yaml").read_text().replace(str(tiny_data.parent), str(root)))
    for image in sorted((root / "images/train").iterdir())[::2]:  # half of them wide (labels are normalised)
        cv2.imwrite(str(image), cv2.resize(cv2.imread(str(image)), (128, 64)))
    args = [f"data={root / 'data.yaml'}", *TINY, "epochs=1", f"project={tmp_path}", "name=rect", "rect=True"]
    trainer = Trainer(load_config(None, args))
    shapes = {tuple(batch["img"].shape[2:]) for batch in trainer.train_loader.epoch(0)}
    assert (96, 96) in shapes and any(h < w for h, w in shapes)  # square and wide batches, never mixed
    assert trainer.train_set.rect
    trainer.train()
    assert len(_rows(tmp_path / "rect")) == 1
