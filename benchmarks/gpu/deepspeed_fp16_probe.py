"""GPU probe: DeepSpeed with fp16 torch_autocast, past our refusal, to see where it fails (docs/backends.md).
usage: [NATIVE_BN=1] torchrun --nproc_per_node 2 benchmarks/gpu/deepspeed_fp16_probe.py tests/gpu/backend_run_worker.py OUT_JSON PROJECT NAME
       backend=zero2 precision=fp16 ...   (NATIVE_BN=1: BatchNorm outside cuDNN)"""

import os
import runpy
import sys

import torch

import yoloscale.backend.deepspeed as d

orig = d.render_ds_config


def render(cfg, precision, accumulate, world):
    ds = orig(cfg, "bf16" if precision == "fp16" else precision, accumulate, world)
    if precision == "fp16":
        ds["torch_autocast"]["dtype"] = "float16"
    return ds


d.render_ds_config = render
if os.environ.get("NATIVE_BN") == "1":
    fwd = torch.nn.BatchNorm2d.forward

    def forward(self, x):
        with torch.backends.cudnn.flags(enabled=False):
            return fwd(self, x)

    torch.nn.BatchNorm2d.forward = forward
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
