"""Constants and helpers shared by the tests (pytest puts tests/ on the path: pyproject's `pythonpath`)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository

# Small, fast settings for end-to-end runs on a 2-core CPU. SGD at lr0 0.01: optimizer=auto would pick AdamW at
# Ultralytics' lr0 for 3 classes (0.0014), which learns this set too slowly for 8 epochs (mAP50 0.36).
TINY = [
    "model=yolov8n.yaml",
    "imgsz=96",
    "batch=8",
    "nbs=8",
    "workers=0",
    "epochs=2",
    "warmup_epochs=0.5",
    "close_mosaic=0",
    "plots=False",
    "optimizer=SGD",
]


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """`python -m yoloscale ARGV` in a fresh process: the exit code and stderr a user would see."""
    return subprocess.run([sys.executable, "-m", "yoloscale", *argv], capture_output=True, text=True, timeout=600)
