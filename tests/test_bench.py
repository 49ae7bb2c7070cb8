"""`yoloscale bench`: its arithmetic, and a complete (tiny, CPU) run that writes every output."""

import json

import pytest

from conftest import run_cli
from yoloscale.bench import mfu, scaling_efficiency, steady_img_s
from yoloscale.errors import UserError


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
    proc = run_cli("bench", "model=yolov8n.yaml", "imgsz=96", "batch=4", "workers=0", f"--out={out}",
                   "--precisions=fp32", "--gpus=1", "--loader-workers=0", "--warmup=2", "--window=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "yoloscale loop fp32" in proc.stdout and "ultralytics (fp16 AMP)" in proc.stdout
    summary = json.loads((out / "bench.json").read_text())
    rows = {r["what"]: r for r in summary["rows"]}
    assert set(rows) == {"ultralytics (fp16 AMP)", "yoloscale loop fp32", "yoloscale bare fp32",
                         "loader alone, 0 workers"}
    loop = rows["yoloscale loop fp32"]
    assert loop["img_s"] > 0 and loop["x_ultralytics"] > 0 and 0 < loop["mfu"] < 1 and loop["x_ceiling"] > 0
    assert summary["peak"]["tflops"] > 0 and "matmul" in summary["peak"]["how"]
    assert "steady state" in summary["method"] and summary["versions"]["ultralytics"]
    assert (out / "bench.png").stat().st_size > 1000


@pytest.mark.parametrize("flag, message", [("--gpus=abc", "--gpus takes a comma list of integers"),
                                           ("--gpus=0", "--gpus values must be >= 1"),
                                           ("--precisions=bf61", "bad value")])
def test_bad_bench_flags_are_clear_errors(flag, message, tmp_path):
    proc = run_cli("bench", f"--out={tmp_path}", flag)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
