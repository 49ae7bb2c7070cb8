"""Where ZeRO's losses part from DDP's (benchmarks/results/backends_h200x2_2026-11-24.md, "Cause found on the CPU"): STEPS steps of yolov8n at 64 px
on 2 gloo ranks, DDP or DeepSpeed ZeRO-2/3, clipping at CLIP (0 = off), fp32 or bf16 autocast.
usage: torchrun --standalone --nproc_per_node 2 benchmarks/deepspeed_drift_probe.py ddp|zero2|zero3 CLIP fp32|bf16 STEPS OUT
       [REDUCE=bf16: DeepSpeed's own default, Conv2d/Linear gradients reduced in bf16; ours reduces in fp32]
Rank 0 saves {"losses", "norms"} per step to OUT; compare two runs' losses.
"""

import os
import sys

import torch
import torch.distributed as dist

from yoloscale.config import load_config
from yoloscale.training.data import ultralytics_args
from yoloscale.training.model import build_model
from yoloscale.training.optim import OptimizerChoice, build_optimizer, init_momentum_buffers

SGD = OptimizerChoice("SGD", lr0=0.01, momentum=0.937, warmup_bias_lr=0.1)

os.environ.setdefault("YOLO_OFFLINE", "1")
mode, clip, prec, steps, out = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
cfg = load_config(None, ["model=yolov8n.yaml", "imgsz=64", "batch=4"])
model = build_model("yolov8n.yaml", 3, {0: "a", 1: "b", 2: "c"}, ultralytics_args(cfg, "unused.yaml"))
opt = None
if mode.startswith("zero"):
    import deepspeed

    from yoloscale.backend.zero import gather_whole_layers, render_ds_config

    torch.Tensor.record_stream = lambda self, stream: None  # DeepSpeed calls this CUDA-only method on the CPU too
    if mode == "zero3":
        gather_whole_layers(model)
    ds = render_ds_config(load_config(None, [f"backend={mode}", "batch=4", f"grad_clip={clip}"]), prec, 4, 2)
    if os.environ.get("REDUCE") == "bf16":
        del ds["torch_autocast"]["lower_precision_safe_modules"]  # DeepSpeed's default list
    opt = build_optimizer(model, SGD, 5e-4, fused=False)
    wrapped, opt, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
else:
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    opt = build_optimizer(model, SGD, 5e-4, fused=False)
    init_momentum_buffers(opt)
criterion = model.init_criterion()
g = torch.Generator().manual_seed(1)
losses, norms = [], []
for step in range(steps):
    images = torch.rand(8, 3, 64, 64, generator=g)
    boxes = torch.rand(8, 4, generator=g) * 0.3 + 0.3
    mine = slice(4 * rank, 4 * rank + 4)
    batch = {"img": images[mine], "batch_idx": torch.arange(4).float(), "cls": torch.zeros(4, 1), "bboxes": boxes[mine]}
    if mode.startswith("zero"):
        loss, _ = criterion(wrapped(images[mine]), batch)
        wrapped.backward(loss.sum())
        wrapped.step()
        norms.append(float(wrapped.get_global_grad_norm() or 0))
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
            preds = wrapped(images[mine])
        loss, _ = criterion(preds, batch)
        loss.sum().backward()
        n = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
        norms.append(float(n))
        opt.step()
        opt.zero_grad(set_to_none=True)
    total = loss.detach().sum().clone()
    dist.all_reduce(total)
    losses.append(total.item())
if rank == 0:
    torch.save({"losses": losses, "norms": norms}, out)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)
