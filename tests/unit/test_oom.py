"""A CUDA out-of-memory error in the first epoch: the epoch restarts at half the per-device batch and twice the
accumulation, and trains exactly as a run started there; when nothing fits, one line says what to try."""

import csv

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY

pytestmark = pytest.mark.slow
# No augmentation draws: the retried epoch sees the same images as a run started at the smaller batch.
PLAIN = ["mosaic=0", "fliplr=0", "hsv_h=0", "hsv_s=0", "hsv_v=0", "translate=0", "scale=0", "val=False"]


def _trainer(tiny_data, tmp_path, name, *overrides):
    from yoloscale.config import load_config
    from yoloscale.training.trainer import Trainer

    cfg = load_config(None, [f"data={tiny_data}", *TINY, *PLAIN, *overrides, f"project={tmp_path}", f"name={name}"])
    return Trainer(cfg)


def _out_of_memory(trainer, times: int):
    """The model's forward raises CUDA's out-of-memory error `times` times, before computing anything."""
    forward, left = trainer.model.forward, [times]

    def failing(*args, **kwargs):
        if left[0]:
            left[0] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return forward(*args, **kwargs)

    trainer.model.forward = failing


def _losses(run):
    with open(run / "results.csv") as f:
        return [float(v) for row in csv.DictReader(f) for k, v in row.items() if k.startswith("train/")]


def test_oom_retry_trains_like_a_run_at_half_the_batch(tiny_data, tmp_path):
    retried = _trainer(tiny_data, tmp_path, "retried", "batch=8", "nbs=8")  # accumulate 1
    _out_of_memory(retried, times=1)
    retried.train()
    assert (retried.device_batch, retried.schedule.accumulate) == (4, 2)
    direct = _trainer(tiny_data, tmp_path, "direct", "batch=4", "nbs=8")  # accumulate 2 from the start
    direct.train()
    assert retried.progress.optimizer_steps == direct.progress.optimizer_steps > 24  # 48 micro-steps, accumulate 1 -> 2
    assert _losses(tmp_path / "retried") == pytest.approx(_losses(tmp_path / "direct"), rel=1e-6)
    a, b = (load_file(str(tmp_path / n / "weights/last.safetensors")) for n in ("retried", "direct"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


def test_oom_that_nothing_fixes_is_one_line_naming_the_batch(tiny_data, tmp_path):
    from yoloscale.errors import UserError

    trainer = _trainer(tiny_data, tmp_path, "never", "batch=8", "nbs=8", "epochs=1")
    _out_of_memory(trainer, times=10)
    with pytest.raises(UserError) as e:
        trainer.train()
    message = str(e.value)
    assert "out of memory at device_batch 1" in message and "imgsz 96" in message  # 8 -> 4 -> 2 -> 1, then stop
    assert "grad_ckpt=highres" in message and "\n" not in message


def test_the_retry_batch_is_half_or_what_the_memory_model_fits_in_what_was_reached():
    from yoloscale.memory.oom import next_batch

    gib = 2**30
    assert next_batch(16, 6.0, None) == 8  # no model: half
    fixed_plus_per_image = lambda b: (2 + b) * gib  # noqa: E731
    assert next_batch(16, 6.0, fixed_plus_per_image) == 4  # 2 + 4 GiB fits in the 6 reached; a divisor of 16
    assert next_batch(12, 20.0, fixed_plus_per_image) == 6  # never more than half
    assert next_batch(16, 2.5, fixed_plus_per_image) == 1  # nothing fits: the smallest batch
