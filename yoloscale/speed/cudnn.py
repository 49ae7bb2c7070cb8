"""`cudnn_benchmark=`: when cuDNN autotunes the training convolutions.

Autotuning times every algorithm for every new input shape: on yolo11x (640 px, batch 32, one H200) it cost ~30 s in
the first step and gave ~9% more img/s per epoch (docs/training.md), so it
pays back after about six minutes of training. `auto` times the first micro-steps of the run without it and
switches it on only when enough training is left. Validation never autotunes (validate.py): its rectangular batches
have many shapes.
"""

from __future__ import annotations

import time

import torch

TIMED = (10, 40)  # micro-steps of this process timed by `auto` (after the start-up's)
WORTH_S = 600.0  # training left, in seconds, above which `auto` autotunes


class Autotune:
    def __init__(self, mode: str, use_cuda: bool):
        self.mode, self.use_cuda = mode, use_cuda
        self.clock: list[float] = []
        torch.backends.cudnn.benchmark = mode == "on" and use_cuda

    def tick(self, steps_left: int) -> str | None:
        """After each micro-step; returns a line to log when `auto` switches autotuning on."""
        first, last = TIMED
        if len(self.clock) > last:
            return None
        self.clock.append(time.perf_counter())
        if len(self.clock) != last + 1 or self.mode != "auto" or not self.use_cuda:
            return None
        left = (self.clock[last] - self.clock[first]) / (last - first) * steps_left
        if left <= WORTH_S:
            return None
        torch.backends.cudnn.benchmark = True
        return f"cudnn_benchmark=auto: {left / 60:.0f} min of training left, cuDNN autotuning on"
