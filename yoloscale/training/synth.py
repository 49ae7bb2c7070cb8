"""A synthetic detection set: coloured shapes with exact boxes, in Ultralytics' YOLO layout.

`mode=easy` (the embedded default): each square image holds 1-4 non-overlapping shapes on a noisy background. The
class is the shape (rectangle, ellipse, triangle); each class also has its own hue range, so a small model learns it
within a few CPU epochs. `mode=hard` (for races that must tell trainers apart): up to 10 classes told apart by shape
alone (any colour for every class, polygons rotated), 1-12 objects from 1% to 30% of the image side, overlapping
(the later drawn hides part of the earlier), on a cluttered background of lines and specks, in images of several
aspect ratios (rectangular validation batches, as real data has). Boxes are computed from the drawn geometry, so
labels are exact (for a partly hidden object, its whole box). Output layout (what check_det_dataset reads):

    DIR/data.yaml
    DIR/images/{train,val}/000000.png
    DIR/labels/{train,val}/000000.txt   # "cls cx cy w h", normalised
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import yaml

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


HARD_NAMES = [
    "rectangle",
    "ellipse",
    "triangle",
    "diamond",
    "pentagon",
    "hexagon",
    "star",
    "cross",
    "ring",
    "half-disc",
]


def _polygon(cls: int, x0: int, y0: int, w: int, h: int, rng: np.random.Generator) -> np.ndarray | None:
    """The outline of a polygonal class inside the box, or None for the round ones (drawn by _draw_hard)."""
    cx, cy, rx, ry = x0 + w / 2, y0 + h / 2, w / 2, h / 2
    turn = rng.uniform(0, 2 * np.pi)

    def around(n: int, radii: list[float]) -> np.ndarray:
        a = turn + np.arange(n * len(radii)) * 2 * np.pi / (n * len(radii))
        r = np.resize(radii, len(a))
        return np.stack([cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)], 1)

    name = HARD_NAMES[cls]
    if name == "rectangle":
        return np.array([[x0, y0], [x0 + w, y0], [x0 + w, y0 + h], [x0, y0 + h]], float)
    if name == "triangle":
        apex = x0 + rng.uniform(0, w)
        pts = np.array([[apex, y0], [x0, y0 + h], [x0 + w, y0 + h]], float)
        return pts if rng.random() < 0.5 else np.stack([pts[:, 0], 2 * cy - pts[:, 1]], 1)  # pointing down
    if name == "diamond":
        return np.array([[cx, y0], [x0 + w, cy], [cx, y0 + h], [x0, cy]], float)
    if name in ("pentagon", "hexagon"):
        return around(5 if name == "pentagon" else 6, [1.0])
    if name == "star":
        return around(5, [1.0, 0.42])
    if name == "cross":
        t, u = w / 6, h / 6
        return np.array(
            [
                [cx - t, y0], [cx + t, y0], [cx + t, cy - u], [x0 + w, cy - u], [x0 + w, cy + u], [cx + t, cy + u],
                [cx + t, y0 + h], [cx - t, y0 + h], [cx - t, cy + u], [x0, cy + u], [x0, cy - u], [cx - t, cy - u],
            ],
            float,
        )  # fmt: skip
    return None


def _draw_hard(img: np.ndarray, cls: int, x0: int, y0: int, w: int, h: int, rng: np.random.Generator) -> tuple:
    """Draw one shape of any colour inside the box; return its exact box (x1, y1, x2, y2)."""
    color = tuple(int(v) for v in rng.integers(90, 256, 3))
    pts = _polygon(cls, x0, y0, w, h, rng)
    if pts is not None:
        pts = np.round(pts).astype(np.int32)
        cv2.fillPoly(img, [pts], color)
        return int(pts[:, 0].min()), int(pts[:, 1].min()), int(pts[:, 0].max()) + 1, int(pts[:, 1].max()) + 1
    center, axes = (x0 + w // 2, y0 + h // 2), (max(w // 2, 1), max(h // 2, 1))
    name = HARD_NAMES[cls]
    if name == "ellipse":
        cv2.ellipse(img, center, axes, 0, 0, 360, color, thickness=-1)
    elif name == "ring":
        thickness = max(min(axes) // 2, 1)
        inner = (max(axes[0] - thickness // 2, 1), max(axes[1] - thickness // 2, 1))
        cv2.ellipse(img, center, inner, 0, 0, 360, color, thickness=thickness)
    else:  # half-disc, the flat side facing one of four ways
        start = 90 * int(rng.integers(0, 4))
        cv2.ellipse(img, center, axes, 0, start, start + 180, color, thickness=-1)
        x1, y1, x2, y2 = center[0] - axes[0], center[1] - axes[1], center[0] + axes[0] + 1, center[1] + axes[1] + 1
        return {
            0: (x1, center[1], x2, y2),
            90: (x1, y1, center[0] + 1, y2),
            180: (x1, y1, x2, center[1] + 1),
            270: (center[0], y1, x2, y2),
        }[start]
    return center[0] - axes[0], center[1] - axes[1], center[0] + axes[0] + 1, center[1] + axes[1] + 1


def _clutter(img: np.ndarray, rng: np.random.Generator) -> None:
    """A background that is not flat: a gradient, noise, thin lines and curves, specks of any colour."""
    hgt, wid = img.shape[:2]
    ramp = np.linspace(0, rng.uniform(20, 70), wid, dtype=np.float32)[None, :, None]
    img[:] = np.clip(img + ramp * rng.uniform(0.3, 1.0, 3)[None, None, :], 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(5, 30))):
        p1 = (int(rng.integers(0, wid)), int(rng.integers(0, hgt)))
        p2 = (int(rng.integers(0, wid)), int(rng.integers(0, hgt)))
        cv2.line(img, p1, p2, tuple(int(v) for v in rng.integers(0, 256, 3)), int(rng.integers(1, 3)))
    side = min(hgt, wid)
    for _ in range(int(rng.integers(10, 60))):
        center = (int(rng.integers(0, wid)), int(rng.integers(0, hgt)))
        cv2.circle(
            img,
            center,
            max(int(side * rng.uniform(0.002, 0.008)), 1),
            tuple(int(v) for v in rng.integers(0, 256, 3)),
            -1,
        )


def make_hard_image(size: int, classes: int, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """One image of the hard mode (longest side `size`) and its labels as (cls, cx, cy, w, h) normalised."""
    short = int(size * rng.uniform(0.6, 1.0)) // 2 * 2
    wid, hgt = (size, short) if rng.random() < 0.7 else (short, size)
    img = rng.integers(0, 70, (hgt, wid, 3), dtype=np.uint8)
    _clutter(img, rng)
    side = min(wid, hgt)
    boxes: list[tuple[int, int, int, int]] = []
    labels = []
    for _ in range(int(rng.integers(1, 13))):
        for _attempt in range(20):  # a spot that hides at most half of any earlier object
            longest = max(int(side * np.exp(rng.uniform(np.log(0.01), np.log(0.3)))), 4)
            ratio = rng.uniform(0.6, 1.6)
            w, h = max(int(longest * min(ratio, 1)), 4), max(int(longest / max(ratio, 1)), 4)
            x0, y0 = int(rng.integers(0, wid - w)), int(rng.integers(0, hgt - h))
            if all(_overlap((x0, y0, x0 + w, y0 + h), b) <= 0.5 for b in boxes):
                break
        else:
            continue
        cls = int(rng.integers(0, classes))
        x1, y1, x2, y2 = _draw_hard(img, cls, x0, y0, w, h, rng)
        x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, wid), min(y2, hgt)
        boxes.append((x1, y1, x2, y2))
        labels.append((cls, (x1 + x2) / 2 / wid, (y1 + y2) / 2 / hgt, (x2 - x1) / wid, (y2 - y1) / hgt))
    return img, labels


def _overlap(new: tuple, old: tuple) -> float:
    """The fraction of `old` that `new` covers."""
    ix = max(0, min(new[2], old[2]) - max(new[0], old[0]))
    iy = max(0, min(new[3], old[3]) - max(new[1], old[1]))
    return ix * iy / max((old[2] - old[0]) * (old[3] - old[1]), 1)


def write_synthetic_dataset(
    out: str | Path,
    n_train: int = 256,
    n_val: int = 64,
    size: int = 160,
    seed: int = 0,
    mode: str = "easy",
    classes: int = 10,
) -> Path:
    """Write the data set under `out` and return the path of its data.yaml."""
    out = Path(out).resolve()
    rng = np.random.default_rng(seed)
    names = NAMES if mode == "easy" else HARD_NAMES[:classes]
    for split, n in (("train", n_train), ("val", n_val)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, labels = make_image(size, rng) if mode == "easy" else make_hard_image(size, classes, rng)
            cv2.imwrite(str(out / "images" / split / f"{i:06d}.png"), img)
            lines = [f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}" for c, cx, cy, w, h in labels]
            (out / "labels" / split / f"{i:06d}.txt").write_text("\n".join(lines) + "\n")
    data_yaml = out / "data.yaml"
    data = {"path": str(out), "train": "images/train", "val": "images/val", "names": dict(enumerate(names))}
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    return data_yaml
