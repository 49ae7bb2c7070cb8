"""`yoloscale bench`: its arithmetic, and a complete (tiny, CPU) run that writes every output."""

import json

import pytest

from helpers import TINY, run_cli
from yoloscale.errors import UserError
from yoloscale.speed.step_timing import loop_and_bare, mfu, scaling_efficiency, steady_img_s


def test_steady_state_is_the_median_of_windows_after_warmup():
    # 2 warm-up steps (slow), then windows of 2 steps of 4 images: 0.1 s, 0.2 s, 0.1 s per window
    times = [0.0, 5.0, 6.0, 6.05, 6.1, 6.2, 6.3, 6.35, 6.4]
    r = steady_img_s(times, images_per_step=4, warmup=2, window=2)
    assert r["windows"] == pytest.approx([80.0, 40.0, 80.0])
    assert r["img_s"] == pytest.approx(80.0)
    with pytest.raises(UserError, match="too few"):
        steady_img_s(times[:3], 4, warmup=2, window=2)


def test_mfu_and_scaling_arithmetic():
    # 200 img/s x 3 x 196 GFLOPs = 117.6 TFLOP/s achieved, on one GPU of 800 TFLOP/s -> 14.7 %
    assert mfu(200, 196, 800, 1) == pytest.approx(0.147)
    assert mfu(400, 196, 800, 2) == pytest.approx(0.147)
    assert scaling_efficiency(380, 200, 2) == pytest.approx(0.95)


@pytest.mark.slow
def test_bench_on_cpu_writes_table_json_and_chart(tmp_path):
    out = tmp_path / "bench"
    proc = run_cli(
        "bench",
        "model=yolov8n.yaml",
        "imgsz=96",
        "batch=4",
        "workers=0",
        f"out={out}",
        "precisions=fp32",
        "gpus=1",
        "loader_workers=0",
        "warmup=2",
        "window=2",
        "variants=channels_last=False",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "yoloscale loop fp32" in proc.stdout and "ultralytics (fp16 AMP)" in proc.stdout
    summary = json.loads((out / "bench.json").read_text())
    rows = {r["what"]: r for r in summary["rows"]}
    assert set(rows) == {
        "ultralytics (fp16 AMP)",
        "yoloscale loop fp32",
        "yoloscale bare fp32",
        "yoloscale loop fp32 channels_last=False",
        "loader alone, 0 workers",
    }
    variant = rows["yoloscale loop fp32 channels_last=False"]
    assert variant["x_eager"] > 0 and variant["first_step_s"] > 0
    loop = rows["yoloscale loop fp32"]
    assert loop["img_s"] > 0 and loop["x_ultralytics"] > 0 and 0 < loop["mfu"] < 1 and loop["x_ceiling"] > 0
    assert summary["peak"]["tflops"] > 0 and "matmul" in summary["peak"]["how"]
    assert "steady state" in summary["method"] and summary["versions"]["ultralytics"]
    assert (out / "bench.png").stat().st_size > 1000


def test_flop_count_does_not_run_the_trained_model(tiny_data, tmp_path):
    """With compile=True the trained model's forward is compiled in place: Ultralytics' FLOP counter (hooks on every
    module, small proxy images) must not call it, or Dynamo recompiles module after module (minutes on a GPU)."""
    from yoloscale.config import load_config
    from yoloscale.training.trainer import Trainer

    trainer = Trainer(load_config(None, [f"data={tiny_data}", *TINY, f"project={tmp_path}"]))
    calls = []
    trainer.raw_model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    eval_keys = set(trainer.eval_model.state_dict())
    result, _ = loop_and_bare(trainer, warmup=1, window=1)
    batches = len(trainer.train_loader)
    assert len(calls) == batches + 1 + 3 + 1  # the loop's batches, then the bare step's warm-up + 3 windows + 1
    assert result["forward_gflops"] > 0
    assert set(trainer.eval_model.state_dict()) == eval_keys  # the counter's buffers went to a copy


@pytest.mark.parametrize(
    "flag, message",
    [
        ("gpus=abc", "gpus takes a comma list of integers"),
        ("gpus=0", "gpus values must be >= 1"),
        ("precisions=bf61", "bad value"),
        ("precision=fp16 outt=x", "'outt'"),
    ],
)
def test_bad_bench_flags_are_clear_errors(flag, message, tmp_path):
    proc = run_cli("bench", f"out={tmp_path}", *flag.split())
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
