"""A synthetic detection set: coloured shapes with exact boxes, in Ultralytics' YOLO layout.

Each image holds 1-4 non-overlapping shapes on a noisy background. The class is the shape (rectangle, ellipse,
triangle); each class also has its own hue range, so a small model learns it within a few CPU epochs. Boxes are
computed from the drawn geometry, so labels are exact. Output layout (what Ultralytics' check_det_dataset reads):

    DIR/data.yaml
    DIR/images/{train,val}/000000.png
    DIR/labels/{train,val}/000000.txt   # "cls cx cy w h", normalised
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from yoloscale.config import _f

NAMES = ["rectangle", "ellipse", "triangle"]
_HUES = [(0, 20), (55, 80), (105, 130)]  # OpenCV hue ranges (0-179), one per class


def _draw(img: np.ndarray, cls: int, x0: int, y0: int, w: int, h: int, rng: np.random.Generator) -> tuple:
    """Draw one filled shape inside the box (x0, y0, w, h); return its exact box as (x1, y1, x2, y2)."""
    hue = int(rng.integers(*_HUES[cls]))
    bgr = cv2.cvtColor(np.uint8([[[hue, rng.integers(150, 256), rng.integers(150, 256)]]]), cv2.COLOR_HSV2BGR)
    color = tuple(int(c) for c in bgr[0, 0])
    if cls == 0:
        cv2.rectangle(img, (x0, y0), (x0 + w - 1, y0 + h - 1), color, thickness=-1)
        return x0, y0, x0 + w, y0 + h
    if cls == 1:
        center, axes = (x0 + w // 2, y0 + h // 2), (w // 2, h // 2)
        cv2.ellipse(img, center, axes, 0, 0, 360, color, thickness=-1)
        return center[0] - axes[0], center[1] - axes[1], center[0] + axes[0] + 1, center[1] + axes[1] + 1
    apex = x0 + int(rng.integers(0, w))
    pts = np.array([[apex, y0], [x0, y0 + h - 1], [x0 + w - 1, y0 + h - 1]], np.int32)
    cv2.fillPoly(img, [pts], color)
    return x0, y0, x0 + w, y0 + h


def make_image(size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    """One image and its labels as (cls, cx, cy, w, h) normalised to [0, 1]."""
    img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)  # dark noise background
    boxes: list[tuple[int, int, int, int]] = []
    labels = []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):  # rejection-sample a free spot so shapes never overlap
            w, h = (int(v) for v in rng.integers(size // 8, size // 3, 2))
            x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            if all(x0 >= bx2 or x0 + w <= bx1 or y0 >= by2 or y0 + h <= by1 for bx1, by1, bx2, by2 in boxes):
                break
        else:
            continue
        cls = int(rng.integers(0, len(NAMES)))
        x1, y1, x2, y2 = _draw(img, cls, x0, y0, w, h, rng)
        boxes.append((x0, y0, x0 + w, y0 + h))
        labels.append((cls, (x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size))
    return img, labels


def write_synthetic_dataset(
    out: str | Path, n_train: int = 256, n_val: int = 64, size: int = 160, seed: int = 0
) -> Path:
    """Write the data set under `out` and return the path of its data.yaml."""
    out = Path(out).resolve()
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, labels = make_image(size, rng)
            cv2.imwrite(str(out / "images" / split / f"{i:06d}.png"), img)
            lines = [f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}" for c, cx, cy, w, h in labels]
            (out / "labels" / split / f"{i:06d}.txt").write_text("\n".join(lines) + "\n")
    data_yaml = out / "data.yaml"
    data = {"path": str(out), "train": "images/train", "val": "images/val", "names": dict(enumerate(NAMES))}
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    return data_yaml


@dataclass
class SynthSettings:
    out: str = _f("", "Output folder (required): data.yaml, images/ and labels/ go there.")
    train: int = _f(256, "Number of train images.")
    val: int = _f(64, "Number of val images.")
    size: int = _f(160, "Image size in pixels.")
    seed: int = _f(0, "Random seed.")


def run(args: list[str]) -> Path:
    """Entry point of `yoloscale data synth out=DIR [train=256 val=64 size=160 seed=0]`."""
    from yoloscale.config import parse_command
    from yoloscale.errors import UserError

    ns, _, _ = parse_command(SynthSettings, args, "data synth", train_keys=False)
    if not ns.out:
        raise UserError("data synth: give out=DIR, the folder to write the data set into.")
    if min(ns.train, ns.val) < 1 or ns.size < 32:
        raise UserError("data synth: train and val must be >= 1 and size >= 32.")
    path = write_synthetic_dataset(ns.out, ns.train, ns.val, ns.size, ns.seed)
    print(f"wrote {path}")
    return path
