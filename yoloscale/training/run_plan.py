"""The run plan: what a run derives from its settings, decided once, here, and read by everyone else.

The settings (config/) say what was asked: `batch=64`, `batch=auto`, `grad_ckpt=auto`, `val_batch=0`, ... The plan
says what the run does with them on its devices: the images per device per micro-step, the global batch, the
micro-steps per optimizer step, the validation batch, the checkpointed layers and the precision. The trainer makes
it once its model and data exist (batch=auto is measured by memory/planner.py first), logs it, writes it to the run
folder (plan.yaml), and replaces it as a whole when an out-of-memory retry halves the per-device batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from yoloscale.config import TrainConfig
from yoloscale.errors import UserError


def requested_device_batch(cfg: TrainConfig, world: int) -> int:
    """Images per device per micro-step as the settings give them: `device_batch`, or the global `batch` split evenly
    over the devices; 0 when `batch` asks for the largest that fits (auto, a fraction, -1: measured on the device)."""
    if cfg.device_batch:
        return cfg.device_batch
    if cfg.batch < 1:
        return 0
    if cfg.batch % world:
        raise UserError(
            f"batch={cfg.batch} does not split evenly over {world} devices; give a multiple of {world} "
            f"(e.g. batch={max(cfg.batch // world, 1) * world}) or device_batch=."
        )
    return int(cfg.batch) // world


def accumulate_rule(cfg: TrainConfig, batch: int) -> int:
    """Micro-steps per optimizer step after warmup: explicit, or Ultralytics' `max(round(nbs / batch), 1)`."""
    return cfg.accumulate or max(round(cfg.nbs / batch), 1)


def capped_accumulate(cfg: TrainConfig, batch: int, batches_per_epoch: int) -> int:
    """The rule's accumulation, never more than an epoch has batches, so that every epoch steps (Ultralytics caps it
    at the run's batches, which can leave epochs of a small data set without a step)."""
    return max(min(accumulate_rule(cfg, batch), batches_per_epoch), 1)


def validation_batch(cfg: TrainConfig, device_batch: int) -> int:
    """Validation images per device: `val_batch`, else twice the training batch (Ultralytics' trainer)."""
    return cfg.val_batch or 2 * device_batch


@dataclass(frozen=True)
class RunPlan:
    backend: str
    precision: str  # what the run computes in: fp16 | bf16 | fp32
    world: int  # training processes
    device_batch: int  # images per device per micro-step
    accumulate: int  # micro-steps per optimizer step after warmup (the schedule ramps it up from 1)
    nominal_accumulate: int  # the rule's accumulation before the epoch cap: weight decay scales with it (Ultralytics)
    val_batch: int  # validation images per device
    grad_ckpt: str  # the checkpointed layers as grad_ckpt= says them ('off', 'all', 'highres', '2-8,10', ...)
    ckpt_layers: tuple[int, ...]  # their indices in model.model
    # settings the run decided itself (batch=auto's device_batch, an out-of-memory retry's...): config.yaml records
    # them, so a resume trains as this run did
    decided: tuple[tuple[str, Any], ...] = ()

    @property
    def batch(self) -> int:
        """The global batch: images per micro-step over all devices."""
        return self.device_batch * self.world

    def recorded(self, cfg: TrainConfig) -> TrainConfig:
        """The settings config.yaml records: the given ones with what the run decided itself."""
        return dataclasses.replace(cfg, **dict(self.decided))

    def with_device_batch(self, device_batch: int, accumulate: int) -> RunPlan:
        """The plan of an out-of-memory retry: a smaller per-device batch, the same images per optimizer step."""
        decided = {**dict(self.decided), "device_batch": device_batch, "accumulate": accumulate}
        return dataclasses.replace(
            self, device_batch=device_batch, accumulate=accumulate, decided=tuple(decided.items())
        )

    def to_dict(self) -> dict[str, Any]:
        plan = dataclasses.asdict(self)
        plan.update(batch=self.batch, ckpt_layers=list(self.ckpt_layers), decided=dict(self.decided))
        return plan

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def make_plan(
    cfg: TrainConfig,
    precision: str,
    world: int,
    device_batch: int,
    ckpt_layers: list[int],
    grad_ckpt: str,
    batches_per_epoch: int,
    decided: dict[str, Any],
) -> RunPlan:
    """The plan of a run whose per-device batch and checkpointed layers are known (given, or planned on the device)
    and whose train loader has `batches_per_epoch` batches. `decided`: the settings the run chose itself."""
    batch = device_batch * world
    return RunPlan(
        backend=cfg.backend,
        precision=precision,
        world=world,
        device_batch=device_batch,
        accumulate=capped_accumulate(cfg, batch, batches_per_epoch),
        nominal_accumulate=accumulate_rule(cfg, batch),
        val_batch=validation_batch(cfg, device_batch),
        grad_ckpt=grad_ckpt,
        ckpt_layers=tuple(ckpt_layers),
        decided=tuple(decided.items()),
    )
