import cv2
import numpy as np
import yaml

from yoloscale.training.synth import _HUES, NAMES, make_image, write_synthetic_dataset


def test_boxes_are_inside_and_tight_around_the_drawn_shape():
    rng = np.random.default_rng(1)
    for _ in range(30):
        img, labels = make_image(160, rng)
        assert labels
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        for cls, cx, cy, w, h in labels:
            x1, y1, x2, y2 = (round(v * 160) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
            assert 0 <= x1 < x2 <= 160 and 0 <= y1 < y2 <= 160
            bright = hsv[y1:y2, x1:x2, 2] >= 100  # shapes have value >= 150, the background < 60
            ys, xs = np.nonzero(bright)
            # the shape touches every side of its box (exact boxes, not loose ones)
            assert ys.min() <= 1 and ys.max() >= (y2 - y1) - 2 and xs.min() <= 1 and xs.max() >= (x2 - x1) - 2
            hue = np.median(hsv[y1:y2, x1:x2, 0][bright])
            lo, hi = _HUES[cls]
            assert lo <= hue < hi  # the label's class is the drawn shape's class


def test_dataset_layout_is_ultralytics(tmp_path):
    data_yaml = write_synthetic_dataset(tmp_path / "s", n_train=5, n_val=3, size=64)
    data = yaml.safe_load(data_yaml.read_text())
    assert data["names"] == dict(enumerate(NAMES))
    assert len(list((tmp_path / "s/images/train").glob("*.png"))) == 5
    assert len(list((tmp_path / "s/labels/val").glob("*.txt"))) == 3
    for line in (tmp_path / "s/labels/train/000000.txt").read_text().split("\n"):
        if line:
            c, *box = line.split()
            assert int(c) < len(NAMES) and all(0 <= float(v) <= 1 for v in box)


def test_hard_mode_boxes_are_exact_inside_and_span_the_size_range(tmp_path):
    from yoloscale.training.synth import HARD_NAMES, make_hard_image

    rng = np.random.default_rng(3)
    shapes, sides, counts = set(), [], []
    for _ in range(40):
        img, labels = make_hard_image(320, 10, rng)
        hgt, wid = img.shape[:2]
        assert max(hgt, wid) == 320 and min(hgt, wid) >= 190  # several aspect ratios
        counts.append(len(labels))
        for cls, cx, cy, w, h in labels:
            shapes.add(cls)
            assert 0 <= cx - w / 2 and cx + w / 2 <= 1 and 0 <= cy - h / 2 and cy + h / 2 <= 1
            sides.append(max(w * wid, h * hgt) / min(hgt, wid))
    assert shapes == set(range(len(HARD_NAMES)))
    assert min(sides) < 0.03 and max(sides) > 0.2 and max(counts) >= 8
    data = yaml.safe_load(write_synthetic_dataset(tmp_path / "h", 3, 2, 128, mode="hard", classes=6).read_text())
    assert data["names"] == dict(enumerate(HARD_NAMES[:6]))
    for f in (tmp_path / "h/labels/train").glob("*.txt"):
        assert all(int(line.split()[0]) < 6 for line in f.read_text().split("\n") if line)


def test_hard_mode_draws_each_box_tightly_for_an_unhidden_object():
    """A single object on a plain background: its box is the drawn pixels' extent (to a pixel)."""
    from yoloscale.training.synth import _draw_hard

    rng = np.random.default_rng(5)
    for cls in range(10):
        img = np.zeros((200, 200, 3), np.uint8)
        x1, y1, x2, y2 = _draw_hard(img, cls, 40, 50, 90, 70, rng)
        ys, xs = np.nonzero(img.max(2))
        assert abs(xs.min() - x1) <= 1 and abs(xs.max() + 1 - x2) <= 1, cls
        assert abs(ys.min() - y1) <= 1 and abs(ys.max() + 1 - y2) <= 1, cls
