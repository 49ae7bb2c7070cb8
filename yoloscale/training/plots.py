"""The pictures Ultralytics' trainer leaves in a run directory, drawn by its own plotting functions: labels.jpg (the
train labels' classes and boxes) and train_batch{N}.jpg (the first batches, and the first after mosaic closes).
They are drawn on the main rank's writer thread (checkpoint/background.py), from CPU copies, so training does not
wait for them; a picture that fails is a warning, never a stopped run. results.png is run_log's; the validation
plots are its validator's (validate.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ultralytics.utils.plotting import plot_images, plot_labels

from yoloscale.errors import warn


def sample_batches(epochs: int, close_mosaic: int, batches_per_epoch: int) -> set[int]:
    """The micro-batch indices whose batch is drawn, as Ultralytics' plot_idx."""
    first = {0, 1, 2}
    if close_mosaic:
        base = (epochs - close_mosaic) * batches_per_epoch
        first |= {base, base + 1, base + 2}
    return first


def draw_batch(batch: dict, path: Path) -> None:
    """A collated training batch (its CPU tensors) with its boxes: Ultralytics' train_batch{N}.jpg."""

    try:
        plot_images(labels=batch, paths=batch["im_file"], fname=path)
    except Exception as e:  # a picture is never worth a run
        warn(f"{path.name} not drawn: {type(e).__name__}: {e}")


def draw_labels(dataset, names: dict, run_dir: Path) -> None:
    """The train labels' class counts and box statistics: Ultralytics' labels.jpg."""

    try:
        boxes = np.concatenate([lb["bboxes"] for lb in dataset.labels], 0)
        cls = np.concatenate([lb["cls"] for lb in dataset.labels], 0)
        plot_labels(boxes, cls.squeeze(), names=names, save_dir=run_dir)
    except Exception as e:
        warn(f"labels.jpg not drawn: {type(e).__name__}: {e}")
