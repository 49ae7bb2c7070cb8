"""Three optimizer steps of yolov8n with Ultralytics' MuSGD, two micro-steps each (accumulation), on a 2-process
gloo group: DDP with Ultralytics' own MuSGD class, FSDP2 and DeepSpeed ZeRO-1/2/3 with our ShardedMuSGD and the
layout the backend attaches (as backend.prepare does), for test_backends.py.
usage: torchrun --nproc_per_node 2 musgd_parity_worker.py ddp|fsdp|zero1|zero2|zero3 OUT_FILE

The micro-steps, backward and step are the backend's own methods, called as the trainer calls them (without an
Accelerator): micro-steps that end no accumulation window skip the gradient reduction (DDP's no_sync, FSDP2's
set_requires_gradient_sync(False), DeepSpeed's accumulation boundary; its own gradient_accumulation_steps stays 1). The loss is Ultralytics' (summed over the images) x
the number of ranks, as the trainer back-propagates it. Both ranks train on the same images and nothing is clipped,
so every backend's gradient is exact (x + x, then / 2) and the runs agree bit for bit: what is compared is the
optimizer on its pieces and the accumulation. (The reduction order is test_sharded_backends_reproduce_ddp's; with
grad_clip=10 each backend's norm differs in its last bits, which MuSGD's bf16 Newton-Schulz amplifies to ~4e-4 in
the weights after three steps.) Rank 0 saves the losses and the final whole weights.
"""

import os
import sys

import torch
import torch.distributed as dist

from yoloscale import backend
from yoloscale.config import load_config
from yoloscale.training.data import ultralytics_args
from yoloscale.training.ema import full_model_state
from yoloscale.training.model import build_model
from yoloscale.training.optim import OptimizerChoice, build_optimizer

os.environ.setdefault("YOLO_OFFLINE", "1")
backend_name, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
cfg = load_config(None, ["model=yolov8n.yaml", "imgsz=64", "batch=8"])
model = build_model("yolov8n.yaml", 3, {0: "a", 1: "b", 2: "c"}, ultralytics_args(cfg, "unused.yaml"))
MUSGD = OptimizerChoice("MuSGD", lr0=0.01, momentum=0.9, warmup_bias_lr=0.0)
be = backend.get(load_config(None, [f"backend={backend_name}"]))
engine = None
if backend_name == "fsdp":
    from yoloscale.backend.fsdp import DTensorLayout, shard_model

    wrapped = shard_model(model)
    opt = build_optimizer(model, MUSGD, 5e-4, sharded=True)
    opt.layout = DTensorLayout()
elif backend_name.startswith("zero"):
    import deepspeed

    from yoloscale.backend.zero import ZeroLayout, gather_whole_layers, render_ds_config

    torch.Tensor.record_stream = lambda self, stream: None  # DeepSpeed calls this CUDA-only method on the CPU too
    if backend_name == "zero3":
        gather_whole_layers(model)
    ds = render_ds_config(load_config(None, [f"backend={backend_name}", "grad_clip=0"]), "fp32", 4, world)
    engine, opt, *_ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, MUSGD, 5e-4, sharded=True), config=ds
    )
    opt.optimizer.layout = ZeroLayout(opt)
    wrapped = engine
else:
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    opt = build_optimizer(model, MUSGD, 5e-4)
    assert type(opt).__module__.startswith("ultralytics")  # Ultralytics' own class under DDP
criterion = model.init_criterion()
g = torch.Generator().manual_seed(1)
losses = []
for step in range(3):
    for micro in range(2):
        sync = micro == 1
        images = torch.rand(4, 3, 64, 64, generator=g)  # the same on both ranks (module docstring)
        boxes = torch.rand(4, 4, generator=g) * 0.3 + 0.3
        batch = {"img": images, "batch_idx": torch.arange(4).float(), "cls": torch.zeros(4, 1), "bboxes": boxes}
        with be.micro_step(wrapped, sync):  # the trainer's calls, without an Accelerator
            loss, _ = criterion(wrapped(images), batch)
            be.backward(loss.sum() * world, wrapped, sync)
        if sync:
            be.step(wrapped, opt, max_norm=0.0)
        total = loss.detach().sum().clone()
        dist.all_reduce(total)
        losses.append(total.item())
weights = full_model_state(model)  # a collective: every rank
if rank == 0:
    torch.save({"losses": losses, "weights": weights}, out)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)  # as sharded_parity_worker.py: skip torch's C++ teardown on gloo
