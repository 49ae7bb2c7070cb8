"""GPU micro-test: does cuDNN BatchNorm fail on an fp16 input when its fp32 weight is a view at an unaligned offset,
as parameters are inside DeepSpeed's flat buffers? (docs/backends.md, DeepSpeed + fp16). And SyncBatchNorm's kernels
(`sync_bn=True`, which we do not make aligned): torch's own, run here through its autograd function on a one-rank
NCCL group. Each case runs in its own process, since a CUDA error poisons the context.
usage: python benchmarks/gpu/batchnorm_alignment.py"""

import subprocess
import sys

CASE = r"""
import torch, sys
dtype, offset, cudnn, clone, sync = sys.argv[1], int(sys.argv[2]), *(a == "1" for a in sys.argv[3:6])
torch.backends.cudnn.enabled = cudnn
x = torch.randn(16, 64, 80, 80, device="cuda", dtype=getattr(torch, dtype)).to(memory_format=torch.channels_last).requires_grad_()
flat = torch.randn(offset + 128, device="cuda", requires_grad=True)
w, b = flat[offset:offset + 64], flat[offset + 64:offset + 128]
if clone: w, b = w.clone(), b.clone()
rm, rv = torch.zeros(64, device="cuda"), torch.ones(64, device="cuda")
if sync:  # the path nn.SyncBatchNorm takes in training with more than one rank
    import os, torch.distributed as dist
    from torch.nn.modules._functions import SyncBatchNorm
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29400 + offset), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl", device_id=torch.device("cuda:0"))
    y = SyncBatchNorm.apply(x, w, b, rm, rv, 1e-5, 0.1, dist.group.WORLD, 1)
else:
    y = torch.nn.functional.batch_norm(x, rm, rv, w, b, training=True)
y.float().sum().backward(); torch.cuda.synchronize()
print("ok", w.data_ptr() % 16, float(y.float().square().mean()))
if sync: dist.destroy_process_group()
"""
for dtype in ("float16", "bfloat16"):
    for offset, cudnn, clone, sync in (
        (0, 1, 0, 0),
        (1, 1, 0, 0),
        (2, 1, 0, 0),
        (1, 0, 0, 0),
        (1, 1, 1, 0),
        (0, 1, 0, 1),
        (1, 1, 0, 1),
        (2, 1, 0, 1),
        (3, 1, 0, 1),
    ):
        r = subprocess.run(
            [sys.executable, "-c", CASE, dtype, str(offset), str(cudnn), str(clone), str(sync)],
            capture_output=True,
            text=True,
            check=False,
        )
        errors = [line for line in r.stderr.splitlines() if "Error:" in line] or r.stderr.splitlines() or ["?"]
        res = r.stdout.strip() or errors[-1][:120]
        kind = "SyncBatchNorm" if sync else f"cudnn={cudnn} clone={clone}"
        print(f"{dtype:9} weight offset {offset * 4:2} B {kind}: {res}")
