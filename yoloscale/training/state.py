"""The trainer's resumable state, one object per piece, each with `state_dict()` / `load_state_dict()`.

A checkpoint is the dict of these pieces (checkpoint/__init__.py writes it), plus what the backend saves itself
(model, optimizer, loss scaler, every rank's RNG states) and the EMA (ema.py). Nothing else survives a resume; the
LR/momentum/accumulate schedule is a pure function of `Progress` and the configuration (optim.Schedule), and the
data position is `Progress.epoch` + `Progress.batch_in_epoch` (the sampler reshuffles from the seed alone). Reading
a piece never changes it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from yoloscale.errors import UserError


@dataclass
class Progress:
    """Where the run is: the counters, the data position, the best fitness, and what it ran on."""

    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed by each rank (the data position)
    micro_step: int = 0  # micro-batches consumed since the start of training (Ultralytics' `ni`)
    optimizer_steps: int = 0
    last_opt_step: int = -1  # micro_step of the last optimizer step (Ultralytics' last_opt_step)
    best_fitness: float = -1.0
    best_epoch: int = 0  # epochs completed when the best fitness was reached (early stopping's reference)
    early_stopped: bool = False
    world_size: int = 1
    device_batch: int = 0
    backend: str = "ddp"  # the backend that wrote the checkpoint (its layout: backend.layout_of)
    optimizer: str = ""  # the optimizer it trains with (what optimizer=auto chose at the start; a resume keeps it)

    def note_best(self, metrics: dict[str, float]) -> bool:
        """After `epoch` was counted: whether this epoch's fitness is the best so far (then recorded as such)."""
        fitness = metrics.get("fitness")
        if fitness is None or fitness <= self.best_fitness:
            return False
        self.best_fitness, self.best_epoch = fitness, self.epoch
        return True

    @staticmethod
    def check_resumable(saved: dict, world: int, device_batch: int, ckpt) -> None:
        """A checkpoint saved mid-epoch continues its data position only with the same processes x device batch."""
        if saved.get("batch_in_epoch") and (saved.get("world_size"), saved.get("device_batch")) != (
            world,
            device_batch,
        ):
            raise UserError(
                f"checkpoint '{ckpt}' was saved mid-epoch with {saved.get('world_size')} process(es) x "
                f"device_batch {saved.get('device_batch')}; resume it with the same, or from an epoch-end "
                f"checkpoint (now {world} x {device_batch})."
            )

    def out_of_patience(self, patience: int, metrics: dict[str, float]) -> bool:
        """Ultralytics' early stopping: `patience` epochs without a better fitness (0: never)."""
        return bool(patience) and self.epoch - self.best_epoch >= patience and "fitness" in metrics

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])


class StepHealth:
    """Optimizer steps skipped for a non-finite loss or gradient norm, counted on the device (no host sync per
    step): the current streak, the longest streak since the last check, and the total."""

    def __init__(self, device: torch.device):
        self.run = torch.zeros((), device=device)
        self.worst = torch.zeros((), device=device)
        self.total = torch.zeros((), device=device)

    def record(self, bad: torch.Tensor) -> None:
        """After an optimizer step: `bad` is 1.0 if it was skipped."""
        self.run = (self.run + 1) * bad
        self.worst = torch.maximum(self.worst, self.run)
        self.total += bad

    def check(self) -> tuple[int, int]:
        """(longest streak since the last check, total skipped); starts a new streak window. A host sync."""
        worst, total = (int(v) for v in torch.stack([self.worst, self.total]).tolist())
        self.worst.zero_()
        return worst, total

    def skipped(self) -> int:
        return int(self.total.item())

    def state_dict(self) -> dict:
        return {"skipped": self.skipped(), "run": int(self.run.item())}

    def load_state_dict(self, state: dict) -> None:
        self.total.fill_(state.get("skipped", 0))
        self.run.fill_(state.get("run", 0))


class LossMeter:
    """Running sums of Ultralytics' loss items, kept on the device until read; resumable (a resumed epoch's
    metrics row covers the whole epoch)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.names: tuple[str, ...] = ()
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, loss_items: dict[str, torch.Tensor]) -> None:
        self.names = self.names or tuple(loss_items)
        items = torch.stack([loss_items[k].detach().float() for k in self.names])
        self.total = items if self.total is None else self.total + items
        self.count += 1

    def means(self) -> dict[str, float]:
        """Means of what was added (rank-local: Ultralytics shows rank 0's losses too); a host sync."""
        if self.total is None:
            return {}
        return dict(zip(self.names, (self.total / self.count).tolist()))

    def reset(self) -> None:
        self.total, self.count = None, 0

    def state_dict(self) -> dict:
        return {
            "names": list(self.names),
            "total": self.total.tolist() if self.total is not None else None,
            "count": self.count,
        }

    def load_state_dict(self, state: dict) -> None:
        self.names = tuple(state.get("names", ()))
        total = state.get("total")
        self.total = torch.tensor(total, device=self.device) if total is not None else None
        self.count = state.get("count", 0)


class TrainingTime:
    """Ultralytics' `time=` (hours; overrides epochs): the training time spent so far, over resumes, and the number
    of epochs it leads to, re-estimated after every epoch as ceil(budget / mean epoch time), validation included.
    Unused without `time=`. The seconds are the slowest rank's, so every rank takes the same decisions."""

    def __init__(self, hours: float, epochs: int):
        self.budget = hours * 3600
        self.seconds = 0.0  # completed epochs' time, resumes included
        self.epochs = epochs  # the current estimate (epochs= itself without a budget)
        self.epoch_started = 0.0

    def start_epoch(self) -> None:
        self.epoch_started = time.perf_counter()

    def now(self) -> float:
        """This rank's training time so far, the running epoch included."""
        return self.seconds + time.perf_counter() - self.epoch_started

    def is_up(self, seconds: float) -> bool:
        return bool(self.budget) and seconds >= self.budget

    def end_epoch(self, seconds: float, epochs_done: int) -> None:
        """`seconds`: the training time so far (the slowest rank's `now()`)."""
        self.seconds = seconds
        if self.budget and epochs_done:
            self.epochs = max(math.ceil(self.budget / (seconds / epochs_done)), 1)

    def state_dict(self) -> dict:
        return {"seconds": self.seconds, "epochs": self.epochs}

    def load_state_dict(self, state: dict) -> None:
        self.seconds = state.get("seconds", 0.0)
        if self.budget:  # a run without time= keeps its epochs= (a resume may change it)
            self.epochs = state.get("epochs", self.epochs)
