"""A resume keeps its word: a changed setting is applied to the restored optimizer and schedule (and said so in the
log), or refused with one line; optimizer=auto keeps what it chose when the run started; results.csv never holds an
epoch twice."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY, run_cli
from yoloscale.config import load_config
from yoloscale.errors import UserError
from yoloscale.training.run_dir import resolve_resume

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sgd_run(tiny_data, tmp_path_factory):
    project = tmp_path_factory.mktemp("resume")
    proc = run_cli("train", f"data={tiny_data}", *TINY, "val=False", "lr0=0.01", f"project={project}", "name=r")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return project / "r"


def _resumed_trainer(run, *overrides):
    from yoloscale.training.trainer import Trainer

    given = [f"resume={run}", *overrides]
    cfg, _, _ = resolve_resume(load_config(None, given), given)
    return Trainer(cfg)


def test_changed_lr0_momentum_and_weight_decay_reach_the_restored_optimizer(sgd_run, capsys):
    trainer = _resumed_trainer(sgd_run, "epochs=3", "lr0=0.02", "momentum=0.8", "weight_decay=0.001")
    try:
        groups = trainer.optimizer.param_groups
        assert {g["initial_lr"] for g in groups} == {0.02}  # not the checkpoint's 0.01
        assert {g["momentum"] for g in groups} == {0.8}  # past warmup: the configured momentum
        decayed = [g["weight_decay"] for g in groups if g["param_group"] == "weight"]
        assert decayed == [pytest.approx(0.001 * trainer.batch * trainer.schedule.accumulate / 8)]  # nbs=8
        assert trainer.schedule.epochs == 3
        said = capsys.readouterr().out
        assert "resume applies changed settings: epochs 2 -> 3, lr0 0.01 -> 0.02, momentum 0.937 -> 0.8" in said
    finally:
        trainer.run_lock.release()
    saved = load_config(sgd_run / "config.yaml")
    assert (saved.lr0, saved.momentum, saved.epochs) == (0.02, 0.8, 3)  # the log, the config and the optimizer agree


@pytest.mark.parametrize(
    "change", ["model=yolov8s.yaml", "optimizer=AdamW", "seed=1", "ema=False", "weights=other.safetensors"]
)
def test_a_change_a_checkpoint_cannot_continue_with_is_one_line(sgd_run, change):
    proc = run_cli("train", f"resume={sgd_run}", change)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    key = change.split("=")[0]
    assert f"resume: {key}=" in proc.stderr and "Start a new run" in proc.stderr


def test_optimizer_auto_keeps_its_first_choice(tiny_data, tmp_path):
    auto = [a for a in TINY if not a.startswith("optimizer")]
    proc = run_cli("train", f"data={tiny_data}", *auto, "epochs=1", "val=False", f"project={tmp_path}", "name=a")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # 100,000 epochs of 2 iterations would make a new run choose MuSGD; the resumed run keeps its AdamW
    trainer = _resumed_trainer(tmp_path / "a", "epochs=100000")
    try:
        assert trainer.choice.name == "AdamW" and "chose AdamW when this run started" in trainer.choice.reason
        assert type(trainer.optimizer.optimizer).__name__ == "AdamW"
    finally:
        trainer.run_lock.release()


def test_an_epoch_whose_checkpoint_failed_is_not_in_results_csv_twice(tiny_data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", YOLOSCALE_FAULT="written@2")  # dies in the epoch-2 save
    base = [f"data={tiny_data}", *TINY, "val=False", "epochs=3", f"project={tmp_path}", "name=m"]
    killed = subprocess.run([sys.executable, "-m", "yoloscale", "train", *base], env=env, capture_output=True)
    assert killed.returncode == 137
    proc = run_cli("train", "resume=auto", f"project={tmp_path}", "name=m")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "m" / "results.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]


@pytest.mark.parametrize("form", [["resume=True"], ["resume"], ["resume=true"], ["resume=auto"], "last.pt"])
def test_ultralytics_resume_forms_continue_the_run(sgd_run, form):
    """resume=True and a bare `resume` (the project's latest run), and resume=RUN/weights/last.pt (that run), as in
    Ultralytics, all continue our checkpoint of the run."""
    from yoloscale.commands.train import train_config

    args = [f"resume={sgd_run / 'weights' / 'last.pt'}"] if form == "last.pt" else form
    cfg = train_config([*args, f"project={sgd_run.parent}", "epochs=3"])
    assert Path(cfg.resume).parent.parent == sgd_run and cfg.epochs == 3
    assert load_config(None, ["resume=False"]).resume == ""


def test_a_file_that_is_not_a_runs_weights_is_refused_in_one_line(tmp_path):
    stray = tmp_path / "model.pt"
    stray.write_bytes(b"x")
    with pytest.raises(UserError, match="is a file; give a run directory, a checkpoint folder or a run's"):
        resolve_resume(load_config(None, [f"resume={stray}"]), [])


def test_an_earlier_runs_metrics_csv_becomes_results_csv(tmp_path):
    """A run written before results.csv took Ultralytics' names: its rows move to results.csv under today's columns
    when the run is opened again (a resume then appends to one file)."""
    from yoloscale.training.run_log import convert_metrics_csv

    (tmp_path / "metrics.csv").write_text(
        "epoch,time,train/box_loss,lr,val/mAP50-95,val/fitness\n1,9.5,2.0,0.01,0.4,0.41\n"
    )
    convert_metrics_csv(tmp_path)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {
            "epoch": "1",
            "time": "9.5",
            "train/box_loss": "2.0",
            "lr/pg0": "0.01",
            "metrics/mAP50-95(B)": "0.4",
            "fitness": "0.41",
        }
    ]
    assert not (tmp_path / "metrics.csv").exists()
