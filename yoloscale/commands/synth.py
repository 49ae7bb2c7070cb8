"""`yoloscale data synth out=DIR [train=256 val=64 size=160 seed=0 mode=easy|hard]`: write a synthetic detection set
(training/synth.py draws it) in Ultralytics' YOLO layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from yoloscale.config import parse_command, setting
from yoloscale.errors import UserError
from yoloscale.training.synth import HARD_NAMES, write_synthetic_dataset


@dataclass
class SynthSettings:
    out: str = setting("", "Output folder (required): data.yaml, images/ and labels/ go there.")
    train: int = setting(256, "Number of train images.")
    val: int = setting(64, "Number of val images.")
    size: int = setting(160, "Image size in pixels (hard mode: the longest side; the other is 60-100% of it).")
    seed: int = setting(0, "Random seed.")
    mode: str = setting(
        "easy",
        "easy: 3 classes with their own colours, 1-4 separate shapes; hard: up to 10 classes by shape alone, 1-12 "
        "overlapping objects of 1-30% of the image side, clutter, several aspect ratios.",
        ("easy", "hard"),
    )
    classes: int = setting(10, "Classes of the hard mode (2-10).")


def run(args: list[str]) -> Path:
    """Entry point of `yoloscale data synth out=DIR [train=256 val=64 size=160 seed=0]`."""
    ns, _, _ = parse_command(SynthSettings, args, "data synth", train_keys=False)
    if not ns.out:
        raise UserError("data synth: give out=DIR, the folder to write the data set into.")
    if min(ns.train, ns.val) < 1 or ns.size < 32:
        raise UserError("data synth: train and val must be >= 1 and size >= 32.")
    if not 2 <= ns.classes <= len(HARD_NAMES):
        raise UserError(f"data synth: classes must be between 2 and {len(HARD_NAMES)}, got {ns.classes}.")
    path = write_synthetic_dataset(ns.out, ns.train, ns.val, ns.size, ns.seed, ns.mode, ns.classes)
    print(f"wrote {path}")
    return path
