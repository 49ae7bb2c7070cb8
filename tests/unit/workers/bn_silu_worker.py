"""The fused BatchNorm + SiLU kernels against eager BatchNorm2d + SiLU, for test_kernels.py. Run with
TRITON_INTERPRET=1 on the CPU (Triton's interpreter; small shapes), or with DEVICE=cuda on a GPU. Prints one JSON line per case: the largest
differences of the output, dx, dweight, dbias (relative to the eager values' scale) and of the running statistics."""

import copy
import json
import os
import sys

import torch
import torch.nn.functional as F

from yoloscale.kernels import bn_silu
from yoloscale.kernels.bn_silu import BatchNormSiLU, fuse_bn_silu

torch.manual_seed(0)
DEVICE = os.environ.get("DEVICE", "cpu")


def case(dtype, n, c, h, w, momentum, steps=2):
    eager = torch.nn.BatchNorm2d(c, momentum=momentum)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5)
        eager.bias.uniform_(-0.5, 0.5)
    fused = BatchNormSiLU(c, momentum=momentum)
    fused.load_state_dict(eager.state_dict())
    eager, fused = eager.to(DEVICE), fused.to(DEVICE)
    result = {"dtype": str(dtype), "shape": [n, c, h, w], "momentum": momentum}
    for _ in range(steps):
        x = (torch.randn(n, c, h, w) * 3 + 2).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
        dy = torch.randn(n, c, h, w).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
        xe = x.float().detach().requires_grad_(True)  # eager reference in fp32, from the same low-precision input
        ye = F.silu(eager(xe))
        ye.backward(dy.float())
        xf = x.detach().requires_grad_(True)
        yf = fused(xf)
        yf.backward(dy)
        assert yf.dtype == dtype and yf.is_contiguous(memory_format=torch.channels_last)

        def rel(a, b):
            a, b = a.detach().float(), b.detach().float()
            return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))

        result.update(
            y=rel(yf, ye),
            dx=rel(xf.grad, xe.grad),
            dweight=rel(fused.weight.grad, eager.weight.grad),
            dbias=rel(fused.bias.grad, eager.bias.grad),
            running_mean=rel(fused.running_mean, eager.running_mean),
            running_var=rel(fused.running_var, eager.running_var),
            batches=[int(fused.num_batches_tracked), int(eager.num_batches_tracked)],
        )
        eager.weight.grad = eager.bias.grad = fused.weight.grad = fused.bias.grad = None
    fused.eval()  # outside training: the eager path, on the fused module's own statistics
    x = torch.randn(n, c, h, w, device=DEVICE)
    result["eval"] = rel(fused(x), F.silu(copy.deepcopy(eager).eval()(x)))
    return result


def _train_step(model, x):
    out = model(x)
    out = out if isinstance(out, (list, tuple)) else list(out.values())
    sum(o.float().square().mean() for o in out if torch.is_tensor(o)).backward()
    return model


def _largest_difference(a, b):
    """The largest relative difference of the gradients and of the state (weights and BN statistics)."""
    grads = max(
        float((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12))
        for p, q in zip(a.parameters(), b.parameters())
        if q.grad is not None  # (Detect's DFL conv is frozen)
    )
    state = max(
        float((u.float() - v.float()).abs().max() / v.float().abs().max().clamp_min(1e-12))
        for u, v in zip(a.state_dict().values(), b.state_dict().values())
    )
    return grads, state


def model_case():
    """yolov8n with every Conv's BatchNorm + SiLU fused: one training forward/backward at 64 px, channels_last,
    against eager; and, as the scale of fp32 rounding through 57 layers, eager channels_last against eager NCHW."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    nchw = DetectionModel("yolov8n.yaml", nc=3, verbose=False).train().to(DEVICE)
    eager = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    fused = copy.deepcopy(eager)
    count = fuse_bn_silu(fused)
    x = torch.rand(4, 3, 64, 64, device=DEVICE)
    _train_step(nchw, x)
    for model in (eager, fused):
        _train_step(model, x.contiguous(memory_format=torch.channels_last))
    grads, state = _largest_difference(fused, eager)
    noise_grads, noise_state = _largest_difference(eager, nchw)
    same_keys = list(fused.state_dict()) == list(eager.state_dict())
    # and inside BN-safe gradient checkpointing: the recomputation runs the kernels again, statistics updated once
    from yoloscale.grad_ckpt import apply_grad_ckpt

    checkpointed = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    checkpointed.zero_grad(set_to_none=True)
    for m in checkpointed.modules():  # back to the state before the step (its statistics were updated by it)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
    fresh = copy.deepcopy(checkpointed)
    fuse_bn_silu(checkpointed)
    apply_grad_ckpt(checkpointed, "all")
    _train_step(checkpointed, x.contiguous(memory_format=torch.channels_last))
    _train_step(fresh, x.contiguous(memory_format=torch.channels_last))
    ckpt_grads, ckpt_state = _largest_difference(checkpointed, fresh)
    return {"model": "yolov8n", "fused": count, "grads": grads, "state": state, "same_keys": same_keys,
            "noise_grads": noise_grads, "noise_state": noise_state, "ckpt_grads": ckpt_grads,
            "ckpt_state": ckpt_state}  # fmt: skip


print(json.dumps(model_case()))
bn_silu.TARGET_PROGRAMS = 2  # few row programs: each one loops over several row blocks
print(json.dumps(case(torch.float16, 4, 40, 20, 20, momentum=0.1)))
bn_silu.TARGET_PROGRAMS = 1024
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    # 37 channels: not a multiple of the channel block; 2 x 9 x 11 = 198 rows: not a multiple of the row block
    for shape in ((2, 37, 9, 11), (3, 8, 16, 16)):
        print(json.dumps(case(dtype, *shape, momentum=0.03 if shape[1] == 37 else None)))
sys.stdout.flush()
