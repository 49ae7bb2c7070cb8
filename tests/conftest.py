import os
from pathlib import Path

import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")  # Ultralytics: no online checks
os.environ.setdefault("WANDB_MODE", "disabled")

from helpers import TINY
from yoloscale.training.synth import write_synthetic_dataset


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic set (96 train / 24 val images of 128 px), shared by the tests that train."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "shapes", n_train=96, n_val=24, size=128)


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory) -> Path:
    """An 8-epoch run of yolov8n on the tiny set (about 20 s on 2 cores), shared by the end-to-end tests."""
    from yoloscale.cli import main

    project = tmp_path_factory.mktemp("runs")
    assert main(["train", f"data={tiny_data}", *TINY, "epochs=8", f"project={project}", "name=r"]) == 0
    return project / "r"
