"""GPU micro-test: does cuDNN BatchNorm fail on an fp16 input when its fp32 weight is a view at an unaligned offset,
as parameters are inside DeepSpeed's flat buffers? (docs/backends.md, DeepSpeed + fp16). Each case runs in its own
process, since a CUDA error poisons the context. usage: python tests/gpu_batchnorm_alignment.py"""

import subprocess
import sys

CASE = r"""
import torch, sys
dtype, offset, cudnn, clone = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
torch.backends.cudnn.enabled = cudnn
x = torch.randn(16, 64, 80, 80, device="cuda", dtype=getattr(torch, dtype)).to(memory_format=torch.channels_last).requires_grad_()
flat = torch.randn(offset + 128, device="cuda", requires_grad=True)
w, b = flat[offset:offset + 64], flat[offset + 64:offset + 128]
if clone: w, b = w.clone(), b.clone()
rm, rv = torch.zeros(64, device="cuda"), torch.ones(64, device="cuda")
y = torch.nn.functional.batch_norm(x, rm, rv, w, b, training=True)
y.float().sum().backward(); torch.cuda.synchronize()
print("ok", w.data_ptr() % 16)
"""
for dtype in ("float16", "bfloat16"):
    for offset, cudnn, clone in ((0, 1, 0), (1, 1, 0), (2, 1, 0), (1, 0, 0), (1, 1, 1)):
        r = subprocess.run(
            [sys.executable, "-c", CASE, dtype, str(offset), str(cudnn), str(clone)],
            capture_output=True,
            text=True,
            check=False,
        )
        res = r.stdout.strip() or (r.stderr.strip().splitlines() or ["?"])[-1][:100]
        print(f"{dtype:9} weight offset {offset * 4:2} B cudnn={cudnn} clone={clone}: {res}")
