import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")  # Ultralytics: no online checks
os.environ.setdefault("WANDB_MODE", "disabled")

from yoloscale.synth import write_synthetic_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic set (96 train / 24 val images of 128 px), shared by the tests that train."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "shapes", n_train=96, n_val=24, size=128)


# Small, fast settings for end-to-end runs on a 2-core CPU. SGD at lr0 0.01: optimizer=auto would pick AdamW at
# Ultralytics' lr0 for 3 classes (0.0014), which learns this set too slowly for 8 epochs (mAP50 0.36).
TINY = ["model=yolov8n.yaml", "imgsz=96", "batch=8", "nbs=8", "workers=0", "epochs=2", "warmup_epochs=0.5",
        "close_mosaic=0", "plots=False", "optimizer=SGD"]


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory) -> Path:
    """An 8-epoch run of yolov8n on the tiny set (about 20 s on 2 cores), shared by the end-to-end tests."""
    from yoloscale.cli import main

    project = tmp_path_factory.mktemp("runs")
    assert main(["train", f"data={tiny_data}", *TINY, "epochs=8", f"project={project}", "name=r"]) == 0
    return project / "r"


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """`python -m yoloscale ARGV` in a fresh process: the exit code and stderr a user would see."""
    return subprocess.run([sys.executable, "-m", "yoloscale", *argv], capture_output=True, text=True, timeout=600)
