"""The memory model (memory/model.py), its choices (planner.py), `yoloscale plan` and `batch=auto`/`grad_ckpt=auto`."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from helpers import ROOT, TINY, run_cli
from yoloscale.memory.model import LayerCost, MemoryModel, StepTime, checkpoint_order, layers_for_batch
from yoloscale.memory.model import peak_report as plan_report

GiB = 2**30


def _fit(**kw) -> MemoryModel:
    """Four layers: 1 and 3 save most when checkpointed, 3 is cheap to recompute; layer 0's saving was not measured
    (the hook's count less its inputs stands in)."""
    layers = [
        LayerCost(saved=10e6, inputs=5e6, saving=-1, share=0.2),
        LayerCost(saved=100e6, inputs=5e6, saving=90e6, share=0.4),
        LayerCost(saved=20e6, inputs=5e6, saving=15e6, share=0.2),
        LayerCost(saved=100e6, inputs=5e6, saving=90e6, share=0.2),
    ]
    base = dict(
        device="test",
        precision="fp16",
        imgsz=320,
        intercept=1 * GiB,
        per_image=250e6,
        per_image_all=30e6,
        reserved_ratio=1.0,
        weights=0.2 * GiB,
        trainable=0.2 * GiB,
        optimizer_state=0.4 * GiB,
        buffers=0.0,
        step_off=StepTime(host=0.05, fixed=0.02, per_image=0.004),
        step_all=StepTime(host=0.09, fixed=0.03, per_image=0.006),
        timed=(1, 8, 16, 1, 40, 80),
        layers=layers,
    )
    return MemoryModel(**{**base, **kw})


def test_the_model_is_linear_in_batch_and_pixels_and_checkpointing_reaches_the_measured_slope():
    fit = _fit()
    assert fit.peak(10, 320, []) - fit.peak(0, 320, []) == pytest.approx(10 * 250e6)
    assert fit.peak(10, 640, []) - fit.peak(0, 640, []) == pytest.approx(40 * 250e6)  # 4x the pixels
    assert fit.activations_per_image([0, 1, 2, 3], 320) == pytest.approx(30e6)  # every layer: what was measured
    assert 30e6 < fit.activations_per_image([1, 3], 320) < fit.activations_per_image([1], 320) < 250e6
    b = fit.largest_batch(20 * GiB, 320, [1, 3])
    assert fit.peak(b, 320, [1, 3]) <= 20 * GiB < fit.peak(b + 1, 320, [1, 3])


def test_sharding_and_offload_divide_the_fixed_part():
    fit = _fit()
    ddp, zero1, zero2, fsdp = (fit.fixed(b, 4) for b in ("ddp", "zero1", "zero2", "fsdp"))
    assert ddp - zero1 == pytest.approx(0.4 * GiB * 3 / 4)  # the optimizer state, a quarter each
    assert zero1 - zero2 == pytest.approx(0.2 * GiB * 3 / 4)  # and the gradients
    assert fsdp < zero2 and fit.fixed("zero2", 4, "optimizer") == pytest.approx(zero2 - 0.1 * GiB)
    assert fit.fixed("ddp", 1) < ddp  # one process: no NCCL allowance


def test_the_savings_measured_per_layer_are_scaled_to_the_measured_whole():
    fit = _fit()  # savings 5 (the hook's count), 90, 15, 90 MB sum to 200; every layer saves 220 measured
    assert fit.activations_per_image([1], 320) == pytest.approx(250e6 - 90e6 * 220 / 200)
    assert fit.activations_per_image([0], 320) == pytest.approx(250e6 - 5e6 * 220 / 200)


def test_a_step_is_the_host_floor_at_small_batches_and_the_gpu_line_at_large_ones():
    fit = _fit()
    assert fit.step_seconds(4, 320, []) == pytest.approx(0.05)  # 0.02 + 0.016 < the host's 0.05
    assert fit.step_seconds(40, 320, []) == pytest.approx(0.02 + 0.004 * 40)
    assert fit.step_seconds(40, 640, []) == pytest.approx(0.02 + 0.004 * 160)  # 4x the pixels
    assert fit.step_seconds(40, 320, [0, 1, 2, 3]) == pytest.approx(0.03 + 0.006 * 40)  # every layer: as measured
    # layer 1 holds 40% of the forward's time: 40% of the way from no checkpointing to all; its host floor a quarter
    assert fit.step_seconds(40, 320, [1]) == pytest.approx(0.024 + 0.0048 * 40)
    assert fit.step_seconds(1, 320, [1]) == pytest.approx(0.05 + 0.04 / 4)
    assert fit.img_s(40, 320, [], world=2) == pytest.approx(80 / (0.02 + 0.004 * 40))


def test_grad_ckpt_auto_checkpoints_the_fastest_choice_that_fits_most_memory_per_recompute_first():
    fit = _fit()
    assert checkpoint_order(fit)[:2] == [3, 1]  # 90 MB saved per 0.2 of the forward, then per 0.4
    limit = fit.peak(40, 320, [3]) + 1
    assert layers_for_batch(fit, 40, limit, 320, "ddp", 1, "none") == [3]
    assert layers_for_batch(fit, 40, fit.peak(40, 320, []) + 1, 320, "ddp", 1, "none") == []
    assert layers_for_batch(fit, 10_000, 2 * GiB, 320, "ddp", 1, "none") is None  # nothing reaches it


def test_batch_auto_with_grad_ckpt_auto_plans_for_speed_or_for_the_largest_batch():
    from yoloscale.memory.planner import best_selection

    fit = _fit()
    limit = 20 * GiB
    fast, fast_batch = best_selection(fit, limit, 320, "ddp", 1, "none")
    big, big_batch = best_selection(fit, limit, 320, "ddp", 1, "none", goal="batch")
    assert big == [0, 1, 2, 3] and big_batch == fit.largest_batch(limit, 320, big)  # every layer: the most room
    assert big_batch > fast_batch and fit.img_s(fast_batch, 320, fast) >= fit.img_s(big_batch, 320, big)
    assert fit.img_s(fast_batch, 320, fast) == max(
        fit.img_s(fit.largest_batch(limit, 320, s), 320, s) for s in ([], [3], [1, 3], [1, 2, 3], [0, 1, 2, 3])
    )


def test_a_fit_round_trips_through_the_cache(tmp_path, monkeypatch):
    from yoloscale.memory import model as plan

    monkeypatch.setenv("YOLOSCALE_CACHE", str(tmp_path))
    plan.store("k", _fit())
    assert plan.cached("k") == _fit()
    assert plan.cached("missing") is None


def test_a_fixed_batch_run_finds_the_cached_fit_of_its_own_model_and_settings_only(tmp_path, monkeypatch):
    from yoloscale.config import load_config
    from yoloscale.memory import model as plan
    from yoloscale.memory.planner import _fit_key, cached_fit
    from yoloscale.training.model import model_spec

    monkeypatch.setenv("YOLOSCALE_CACHE", str(tmp_path))
    cfg = load_config(None, ["model=yolov8n.yaml", "imgsz=320", "optimizer=SGD"])
    spec, cpu = model_spec(cfg.model, False), torch.device("cpu")
    assert cached_fit(cfg, spec, cpu, "fp16", 3) is None  # nothing measured: nothing to compare with
    plan.store(_fit_key(cfg, spec, cpu, "fp16", 3, 320)[0], _fit())
    assert cached_fit(cfg, spec, cpu, "fp16", 3) == _fit()
    for other in (["imgsz=640"], ["optimizer=AdamW"], ["model=yolov8s.yaml"]):
        other_cfg = load_config(None, ["model=yolov8n.yaml", "imgsz=320", "optimizer=SGD", *other])
        assert cached_fit(other_cfg, model_spec(other_cfg.model, False), cpu, "fp16", 3) is None, other
    assert cached_fit(cfg, spec, cpu, "bf16", 3) is None and cached_fit(cfg, spec, cpu, "fp16", 5) is None


def test_the_log_compares_the_real_peak_with_the_predicted_one():
    assert plan_report(10 * GiB, 8 * GiB, 10) == (
        "peak memory 10.0 GiB after 10 steps; the plan predicted 8.0 GiB (real 1.25x predicted)"
    )
    assert "real 0.90x predicted" in plan_report(9 * GiB, 10 * GiB, 20)
    assert "no memory model is cached" in plan_report(9 * GiB, 0.0, 20) and "9.0 GiB after 20 steps" in plan_report(
        9 * GiB, 0.0, 20
    )


@pytest.mark.slow
def test_a_cpu_plan_of_a_tiny_model_predicts_its_measured_peak():
    """yolov8n at 128 px, batch 32, on the CPU (glibc told to return freed memory, so the resident peak follows the
    tensors): the predicted growth of the peak over batch 1, without and with every layer checkpointed, against the
    measured one. The CPU's resident memory is noisier than CUDA's allocator: the bound is wide, and errs high."""
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="65536",
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/unit/workers/plan_accuracy.py"), "yolov8n.yaml", "128", "32"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for selection, r in result.items():
        assert 0.85 <= r["predicted_growth"] / r["measured_growth"] <= 1.5, (selection, r)


@pytest.mark.slow
def test_plan_prints_the_options_and_says_what_is_wrong(tmp_path):
    env_cache = f"YOLOSCALE_CACHE={tmp_path}"
    os.environ["YOLOSCALE_CACHE"] = str(tmp_path)
    try:
        no_memory = run_cli("plan", "model=yolov8n.yaml", "imgsz=96")
        assert no_memory.returncode == 2 and "give gpu_memory=" in no_memory.stderr, env_cache
        proc = run_cli("plan", "model=yolov8n.yaml", "imgsz=96", "gpu_memory=2GiB", "gpus=2", "backends=ddp,fsdp")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.count("<- best") == 1 and "A CPU plan" in proc.stdout and "fsdp" in proc.stdout
        assert "The memory model was measured now" in proc.stdout
        again = run_cli("plan", "model=yolov8n.yaml", "imgsz=96", "gpu_memory=2GiB", f"json={tmp_path}/plan.json")
        assert "The memory model is a cached measurement from" in again.stdout and str(tmp_path) in again.stdout
        rows = json.loads((tmp_path / "plan.json").read_text())["rows"]
        assert sum(r["best"] for r in rows) == 1 and all(r["device_batch"] >= 1 and r["peak"] > 0 for r in rows)
        never = run_cli("plan", "model=yolov8n.yaml", "imgsz=96", "gpu_memory=20MiB")
        assert never.returncode == 2 and "does not fit at device_batch 1" in never.stderr
        bad = run_cli("plan", "model=yolov8n.yaml", "gpu_memory=lots")
        assert bad.returncode == 2 and "gpu_memory" in bad.stderr
    finally:
        del os.environ["YOLOSCALE_CACHE"]


@pytest.mark.slow
def test_batch_auto_and_grad_ckpt_auto_train_and_record_their_choice(tiny_data, tmp_path, monkeypatch):
    from yoloscale.cli import main

    monkeypatch.setenv("YOLOSCALE_CACHE", str(tmp_path / "cache"))
    args = [f"data={tiny_data}", *TINY, "epochs=1", "val=False", f"project={tmp_path}"]
    assert main(["train", *args, "batch=auto", "grad_ckpt=auto", "name=auto"]) == 0
    saved = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    assert isinstance(saved["device_batch"], int) and 1 <= saved["device_batch"] <= 96  # at most the data set
    assert saved["grad_ckpt"] == "off" or all(c.isdigit() or c == "," for c in saved["grad_ckpt"])
    plan = yaml.safe_load((tmp_path / "auto" / "plan.yaml").read_text())  # the run plan, beside the settings
    assert plan["device_batch"] == plan["batch"] == saved["device_batch"] and plan["grad_ckpt"] == saved["grad_ckpt"]
    assert plan["decided"] == {"device_batch": saved["device_batch"], "grad_ckpt": saved["grad_ckpt"]}
    # a fixed batch with grad_ckpt=auto: the fastest choice that fits (this CPU fits batch 8 without any)
    assert main(["train", *args, "grad_ckpt=auto", "name=fixed"]) == 0
    assert yaml.safe_load((tmp_path / "fixed" / "config.yaml").read_text())["grad_ckpt"] == "off"
