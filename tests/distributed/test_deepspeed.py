"""DeepSpeed ZeRO: the JSON rendered from our configuration, fp16 (loss scaling, aligned BatchNorm), ZeRO-3's gather
units, fp32 outputs for the loss. Parity with DDP on 2 gloo ranks is in test_backends.py."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT
from yoloscale.backend.zero import render_ds_config
from yoloscale.config import load_config
from yoloscale.errors import UserError


def _cfg(*overrides):
    return load_config(None, list(overrides))


def _run_deepspeed_script(code: str, port: int) -> subprocess.CompletedProcess:
    """A DeepSpeed engine on the CPU, one process over gloo (Accelerate never selects DeepSpeed without GPUs)."""
    pytest.importorskip("deepspeed")
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        PYTHONPATH=str(ROOT),
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


# --- the rendered JSON -----------------------------------------------------------------------------------------
def test_ds_config_fills_the_fields_we_own():
    ds = render_ds_config(_cfg("backend=zero2", "batch=16", "grad_clip=5"), "bf16", device_batch=8, world=2)
    assert ds["zero_optimization"]["stage"] == 2
    # DeepSpeed's accumulation stays 1: the trainer accumulates and marks the boundaries (Ultralytics' ramp)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        8,
        1,
        16,
    )
    assert ds["gradient_clipping"] == 5.0
    # fp32 gradient reduction like DDP: DeepSpeed's default reduces Conv2d/Linear gradients in the autocast dtype
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False  # never the whole-model cast
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert '"auto"' not in json.dumps(ds)


def test_ds_config_keeps_a_users_bf16_gradient_reduction(tmp_path):
    user = json.loads((ROOT / "ds_configs/zero2.json").read_text())
    del user["torch_autocast"]["lower_precision_safe_modules"]  # a JSON written for DeepSpeed's defaults: ours apply
    (tmp_path / "plain.json").write_text(json.dumps(user))
    ds = render_ds_config(
        _cfg("backend=zero2", f"ds_config={tmp_path / 'plain.json'}"), "bf16", device_batch=16, world=1
    )
    assert ds["torch_autocast"]["lower_precision_safe_modules"] == []
    user["torch_autocast"]["lower_precision_safe_modules"] = ["torch.nn.Conv2d"]  # asked for explicitly: kept
    (tmp_path / "bf16.json").write_text(json.dumps(user))
    ds = render_ds_config(
        _cfg("backend=zero2", f"ds_config={tmp_path / 'bf16.json'}"), "bf16", device_batch=16, world=1
    )
    assert ds["torch_autocast"]["lower_precision_safe_modules"] == ["torch.nn.Conv2d"]


def test_ds_config_offload_and_fp32():
    ds = render_ds_config(_cfg("backend=zero3", "offload=params"), "fp32", device_batch=16, world=1)
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False  # else DeepSpeed refuses YOLO's SGD when offloading
    assert "zero_force_ds_cpu_optimizer" not in render_ds_config(
        _cfg("backend=zero2"), "fp32", device_batch=16, world=1
    )
    assert ds["torch_autocast"]["enabled"] is False and "dtype" not in ds["torch_autocast"]  # "auto" is refused
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] >= 1e5  # YOLO's many small tensors stay whole


def test_ds_config_refuses_a_disagreeing_user_file(tmp_path):
    user = json.loads((ROOT / "ds_configs/zero2.json").read_text())
    user["gradient_accumulation_steps"] = 8
    (tmp_path / "ds.json").write_text(json.dumps(user))
    with pytest.raises(UserError, match=r"gradient_accumulation_steps=8.*accumulate="):
        render_ds_config(_cfg("backend=zero2", f"ds_config={tmp_path / 'ds.json'}"), "bf16", device_batch=16, world=1)
    (tmp_path / "bad.json").write_text('{"zero_optimization": {\n  "stage": 2,,\n}}')
    with pytest.raises(UserError, match="line 2"):
        render_ds_config(_cfg("backend=zero2", f"ds_config={tmp_path / 'bad.json'}"), "bf16", device_batch=16, world=1)


def test_deepspeed_fp16_runs_under_autocast_not_a_whole_model_cast():
    ds = render_ds_config(_cfg("backend=zero1"), "fp16", device_batch=16, world=1)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "float16", "lower_precision_safe_modules": []}
    assert ds["fp16"]["enabled"] is False and ds["bf16"]["enabled"] is False


@pytest.mark.parametrize("dtype, cloned", [(torch.float16, True), (torch.bfloat16, False)])
def test_aligned_batchnorm_hands_cudnn_aligned_weights_and_changes_nothing_else(monkeypatch, dtype, cloned):
    """A BatchNorm whose weight and bias are views 4 bytes into a flat buffer (as DeepSpeed keeps parameters): under
    an fp16 input the batch_norm call sees 16-byte aligned copies; output, gradients and running statistics are those
    of a plain BatchNorm2d, and the module keeps its own parameters."""
    from yoloscale.backend.zero import AlignedBatchNorm2d, align_batchnorm_params

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.BatchNorm2d(8))
    plain = copy.deepcopy(model)
    assert align_batchnorm_params(model) == 1 and type(model[1]) is AlignedBatchNorm2d
    flat = torch.zeros(1 + 16)
    flat[1:9], flat[9:] = model[1].weight.detach(), model[1].bias.detach()
    model[1].weight.data, model[1].bias.data = flat[1:9], flat[9:]
    weight = model[1].weight
    assert weight.data_ptr() % 16 == flat.data_ptr() % 16 + 4
    seen = []
    real = torch.nn.functional.batch_norm
    monkeypatch.setattr(
        torch.nn.functional,
        "batch_norm",
        lambda x, m, v, w, b, *a, **k: (
            seen.append(w.data_ptr() % 16 + b.data_ptr() % 16) or real(x, m, v, w, b, *a, **k)
        ),
    )
    x = torch.randn(4, 3, 6, 6)
    with torch.autocast("cpu", dtype):  # the conv hands BatchNorm a low-precision input, as under DeepSpeed's autocast
        out, ref = model(x), plain(x)
    assert out.dtype == dtype
    (out.float().square().sum()).backward()
    ref.float().square().sum().backward()
    assert seen == [0, 0] if cloned else seen[0] != 0
    torch.testing.assert_close(out, ref)
    assert model[1].weight is weight and isinstance(weight, torch.nn.Parameter)
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_zero3_gathers_whole_layers_except_the_first_and_frozen_ones():
    """The first layer (input needs no gradient) and Detect (frozen DFL conv) keep DeepSpeed's per-module hooks;
    every other layer with parameters is one gather unit (backend/zero.py says why)."""
    pytest.importorskip("deepspeed")
    from deepspeed.utils import z3_leaf_module
    from ultralytics.nn.tasks import DetectionModel

    from yoloscale.backend.zero import gather_whole_layers

    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    leaves = gather_whole_layers(model)
    with_params = [i for i, m in enumerate(model.model) if any(True for _ in m.parameters())]
    assert leaves == with_params[1:-1]  # yolov8n: Conv/C2f/SPPF layers 1..21, not 0, not Detect (22)
    assert [i for i, m in enumerate(model.model) if z3_leaf_module(m)] == leaves


def test_zero3_unshares_ultralytics_shared_activation_without_changing_the_model():
    """Ultralytics' Conv uses one class-level SiLU everywhere; ZeRO-3 hooked it once per parent (76 hooks on yolo11x,
    all run on each of its calls). Each parent gets its own copy; weights, state dict keys and outputs stay equal."""
    from ultralytics.nn.tasks import DetectionModel

    from yoloscale.backend.zero import unshare_stateless_modules

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False).eval()
    before = copy.deepcopy(model)
    acts = [m.act for m in model.modules() if hasattr(m, "act") and isinstance(m.act, torch.nn.SiLU)]
    assert len({id(a) for a in acts}) == 1 < len(acts)  # the sharing this undoes
    assert unshare_stateless_modules(model) == len(acts) - 1
    acts = [m.act for m in model.modules() if hasattr(m, "act") and isinstance(m.act, torch.nn.SiLU)]
    assert len({id(a) for a in acts}) == len(acts)
    assert unshare_stateless_modules(model) == 0
    assert before.state_dict().keys() == model.state_dict().keys()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(before(x)[0], model(x)[0])


DEEPSPEED_BF16_OUTPUTS = """
import torch, torch.distributed as dist, deepspeed
from yoloscale.backend import autocast_forward
torch.Tensor.record_stream = lambda self, stream: None  # CUDA-only method DeepSpeed calls on the CPU too
dist.init_process_group("gloo")
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
seen = []
model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
ds = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
      "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=ds)
before = engine(torch.rand(2, 3, 8, 8)).dtype
autocast_forward(engine.module, autocast=None)  # what backend.prepare does to a DeepSpeed engine
out = engine(torch.rand(2, 3, 8, 8))
engine.backward(out.sum())
engine.step()
print(before, out.dtype, seen)
"""


def test_deepspeed_autocast_outputs_reach_the_loss_in_fp32():
    """DeepSpeed's torch_autocast returns bf16 outputs, and the YOLO loss computed on them in bf16 was ~3% off DDP's
    (GPU, docs/backends.md); wrapped as backend.prepare does, the model still computes in bf16 and returns fp32."""
    proc = _run_deepspeed_script(DEEPSPEED_BF16_OUTPUTS, 29731)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "torch.bfloat16 torch.float32 [torch.bfloat16, torch.bfloat16]"


FP16_LOSS_SCALE_RESUME = """
import sys, torch, torch.distributed as dist, deepspeed
from yoloscale.backend.zero import align_batchnorm_params, use_dynamic_loss_scaler
torch.Tensor.record_stream = lambda self, stream: None  # CUDA-only method DeepSpeed calls on the CPU too
dist.init_process_group("gloo")
ds = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
      "gradient_clipping": 10.0, "torch_autocast": {"enabled": True, "dtype": "float16"}}

def engine():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    align_batchnorm_params(model)
    eng, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=ds)
    use_dynamic_loss_scaler(eng, 2.0**40)  # fp16 gradients overflow at this scale
    return eng

eng = engine()
x = torch.rand(2, 3, 8, 8)
for _ in range(2):
    eng.backward(eng(x).float().square().sum())
    eng.step()
scales = [eng.optimizer.loss_scale, eng.skipped_steps, eng.get_global_grad_norm()]
eng.save_checkpoint(sys.argv[1], tag="t")
resumed = engine()
resumed.load_checkpoint(sys.argv[1], tag="t")
print(scales, resumed.optimizer.loss_scale)
"""


def test_deepspeed_fp16_halves_its_loss_scale_on_overflow_and_resumes_with_it(tmp_path):
    """ZeRO-2 under fp16 autocast with our loss scaler: two overflowing steps are skipped, each halving the scale (the
    GradScaler DeepSpeed installs stayed where it was), the reported norm is inf (so the trainer counts the skip), and
    a checkpoint restores the scale reached, not the initial one."""
    proc = _run_deepspeed_script(FP16_LOSS_SCALE_RESUME.replace("sys.argv[1]", repr(str(tmp_path))), 29732)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"[{2.0**38}, 2, inf] {2.0**38}"


def test_deepspeed_fp16_repair_refuses_an_optimizer_it_does_not_know():
    """The loss-scaler repair sets DeepSpeed internals; on an optimizer without them it stops with the reason."""
    pytest.importorskip("deepspeed")
    from types import SimpleNamespace

    from yoloscale.backend.zero import use_dynamic_loss_scaler

    with pytest.raises(UserError, match="lacks torch_autocast_gradscaler"):
        use_dynamic_loss_scaler(SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=None)), 2.0**10)
