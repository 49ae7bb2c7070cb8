"""The fused BatchNorm + SiLU Triton kernels against eager BatchNorm2d + SiLU, on the CPU under Triton's interpreter
(TRITON_INTERPRET=1, in a fresh process: Triton reads it when the kernels are defined). Shapes are small; channel
and row counts that are not multiples of the kernel's blocks, and programs that loop over several row blocks, are
included. Tolerances are the dtype's rounding of the output; statistics and weight gradients are fp32 sums."""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

ROUNDING = {"torch.float32": 1e-5, "torch.float16": 2e-3, "torch.bfloat16": 2e-2}  # of y and dx, relative


@pytest.fixture(scope="module")
def cases():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    worker = ROOT / "tests/unit/workers/bn_silu_worker.py"
    run = subprocess.run([sys.executable, str(worker)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def test_fused_bn_silu_matches_eager_forward_backward_and_statistics(cases):
    layers = [c for c in cases if "dtype" in c]
    assert {c["dtype"] for c in layers} == set(ROUNDING) and len(layers) == 7
    for c in layers:
        assert c["y"] < ROUNDING[c["dtype"]] and c["dx"] < ROUNDING[c["dtype"]], c
        assert c["dweight"] < 1e-5 and c["dbias"] < 1e-5, c  # fp32 sums of the same inputs
        assert c["running_mean"] < 1e-5 and c["running_var"] < 1e-5, c  # momentum and cumulative (None)
        assert c["batches"][0] == c["batches"][1] == 2 and c["eval"] < 1e-6, c


def test_a_fused_yolo_model_trains_like_eager(cases):
    """Every Conv of yolov8n fused: the same state-dict keys, and gradients and BatchNorm statistics after one step
    as close to eager's as eager channels_last is to eager NCHW (about 1e-4 through 57 layers in fp32); also with
    every layer checkpointed."""
    (model,) = [c for c in cases if "model" in c]
    assert model["fused"] == 57 and model["same_keys"]
    assert model["grads"] < 2e-3 and model["state"] < 2e-3, model
    # the same inside grad_ckpt=all: the recomputed kernels update BatchNorm's statistics once (a second update
    # would be a difference of order 1 in num_batches_tracked and the running statistics)
    assert model["ckpt_grads"] < 2e-3 and model["ckpt_state"] < 2e-3, model


def test_a_run_with_fused_bn_silu_trains_and_exports(tiny_data, tmp_path, capsys):
    """On the CPU the fused modules run their eager fallback (the input is not channels_last there): the run trains,
    says what it fused, and its weights (from the eval copy, never fused) are an ordinary Ultralytics checkpoint."""
    from helpers import TINY
    from yoloscale.cli import main

    args = [f"data={tiny_data}", *TINY, "epochs=1", f"project={tmp_path}", "name=f", "fused_bn_silu=True"]
    assert main(["train", *args]) == 0
    printed = capsys.readouterr()
    assert "BatchNorm+SiLU fused in 57 Convs" in printed.out + printed.err
    from ultralytics import YOLO

    model = YOLO(str(tmp_path / "f" / "weights" / "last.pt")).model
    assert not any(type(m).__name__ == "BatchNormSiLU" for m in model.modules())


@pytest.mark.parametrize("other", ["compile=True", "sync_bn=True"])
def test_fused_bn_silu_refuses_what_it_cannot_combine_with(other):
    from yoloscale.config import load_config
    from yoloscale.errors import UserError

    with pytest.raises(UserError, match="fused_bn_silu=True cannot be combined"):
        load_config(None, ["fused_bn_silu=True", other])
