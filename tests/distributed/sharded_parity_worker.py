"""Three training steps of yolov8n on a 2-process gloo group, as DDP, as FSDP2 with our wrap policy, or as DeepSpeed
ZeRO-2/3 with our configuration (ZeRO-3 with its whole-layer gathers), for test_backends.py.
usage: torchrun --nproc_per_node 2 sharded_parity_worker.py MODE[,MODE...] OUT_DIR (writes OUT_DIR/MODE.pt)
MODE: ddp|fsdp|fsdp_ckpt|fsdp_cheap|zero2|zero3|zero3_ckpt|zero3_cheap in fp32 (_ckpt: grad_ckpt=all, _cheap: and
grad_ckpt_recompute=cheap), each also with _compile (every layer compiled, compile_scope=layers, with aot_eager), or ddp_bf16|zero2_bf16 (bf16 autocast, no clipping), or ddp_fp16|zero2_fp16|zero3_fp16
(fp16 autocast and dynamic loss scaling from a scale so high that the first steps overflow, no clipping: torch's
GradScaler on DDP, our DeepSpeed loss scaler and aligned BatchNorm on ZeRO)

Each rank trains on its own 4 of 8 fixed random images; the optimizer is ours (Ultralytics' groups, SGD: fused, on
FSDP2's DTensors through fsdp.enable_fused_sgd; fsdp_ckpt keeps the foreach fallback); backward and step are the
backend's own methods (base.Backend.backward/step), called as the trainer calls them but without an Accelerator.
DeepSpeed runs on the CPU here (its CPU accelerator over our gloo group; Accelerate never selects it without GPUs):
the engine is built the way Accelerate builds it, from our rendered JSON, with DeepSpeed clipping and stepping.
The _bf16 modes clip nothing: DeepSpeed sums the gradient norm in another order (1e-6 apart), and bf16 training
amplifies that into visibly different losses within a few steps; without clipping, what is compared is the gradient
reduction itself (DeepSpeed reduces Conv2d/Linear gradients in bf16 unless told otherwise).
Rank 0 saves the per-step losses (summed over ranks), which steps were skipped, the fp16 loss scale after each
step, the final full weights and the
sharded EMA's full state.
"""

import os
import sys

import torch
import torch.distributed as dist

from yoloscale import backend
from yoloscale.backend.fsdp import enable_fused_sgd, shard_model
from yoloscale.config import load_config
from yoloscale.memory.grad_ckpt import apply_grad_ckpt
from yoloscale.speed.compile import compile_training_model
from yoloscale.training.data import ultralytics_args
from yoloscale.training.ema import ShardedEMA, full_model_state
from yoloscale.training.model import build_model
from yoloscale.training.optim import OptimizerChoice, build_optimizer, init_momentum_buffers

os.environ.setdefault("YOLO_OFFLINE", "1")
SGD = OptimizerChoice("SGD", lr0=0.01, momentum=0.937, warmup_bias_lr=0.1)
FP16_SCALE = 2.0**14  # yolov8n at 64 px overflows at this scale in the first steps: the scaler must come down


def run(mode: str, out: str) -> None:
    mode, compiled = mode.removesuffix("_compile"), mode.endswith("_compile")  # layers compiled with aot_eager
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode.split("_")[-1])  # autocast dtype, if any
    clip = 0.0 if low else 10.0
    torch.manual_seed(0)
    cfg = load_config(None, ["model=yolov8n.yaml", "imgsz=64", "batch=4"])
    be = backend.get(
        load_config(None, [f"backend={mode.split('_')[0]}"])
    )  # its backward and step, as the trainer calls them
    model = build_model("yolov8n.yaml", 3, {0: "a", 1: "b", 2: "c"}, ultralytics_args(cfg, "unused.yaml"))
    if compiled:  # before grad_ckpt, as the trainer does: the checkpoint recomputes the compiled layer
        compile_training_model(model, "default", "layers", backend="aot_eager")
    if mode.endswith(("ckpt", "cheap")):
        apply_grad_ckpt(model, "all", "cheap" if mode.endswith("cheap") else "all")
    opt = None
    if mode.startswith("fsdp"):
        wrapped = shard_model(model)
    elif mode.startswith("zero"):
        import deepspeed

        from yoloscale.backend.zero import (
            align_batchnorm_params,
            gather_whole_layers,
            render_ds_config,
            use_dynamic_loss_scaler,
        )

        torch.Tensor.record_stream = lambda self, stream: None  # DeepSpeed calls this CUDA-only method on the CPU too
        if mode.startswith("zero3"):
            gather_whole_layers(model)
        precision = mode.split("_")[-1] if low else "fp32"
        ds = render_ds_config(
            load_config(None, [f"backend={mode.split('_')[0]}", "batch=4", f"grad_clip={clip}"]), precision, 4, 2
        )
        if precision == "fp16":
            align_batchnorm_params(model)
        opt = build_optimizer(model, SGD, 5e-4, fused=False)
        wrapped, opt, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
        if precision == "fp16":
            use_dynamic_loss_scaler(wrapped, FP16_SCALE)
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    if opt is None:
        opt = build_optimizer(model, SGD, 5e-4, fused=mode == "ddp" or (mode == "fsdp" and enable_fused_sgd()))
        init_momentum_buffers(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=FP16_SCALE) if mode == "ddp_fp16" else None
    ema = ShardedEMA(model, tau=2.0)  # a short ramp so three updates move the EMA visibly
    criterion = model.init_criterion()
    g = torch.Generator().manual_seed(1)
    losses, skipped, scales = [], [], []  # scales: the loss scale after each step (fp16 modes)
    for step in range(4):  # the fourth: a non-finite gradient, a step that must be skipped (DDP and FSDP2 only)
        images = torch.rand(8, 3, 64, 64, generator=g)
        boxes = torch.rand(8, 4, generator=g) * 0.3 + 0.3
        mine = slice(4 * rank, 4 * rank + 4)
        batch = {
            "img": images[mine],
            "batch_idx": torch.arange(4).float(),
            "cls": torch.zeros(4, 1),
            "bboxes": boxes[mine],
        }
        with torch.autocast("cpu", low or torch.bfloat16, enabled=bool(low) and not mode.startswith("zero")):
            preds = wrapped(images[mine])  # (DeepSpeed: its own autocast)
        loss, _ = criterion(preds, batch)
        if step == 3 and (mode.startswith("zero") or scaler):  # the forward only (it updates BatchNorm's statistics)
            break
        if mode.startswith("zero") or scaler:
            if scaler:  # torch's dynamic loss scaling, as Accelerate runs it for fp16 DDP
                scaler.scale(loss.sum()).backward()
                before = scaler.get_scale()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                skipped.append(scaler.get_scale() < before)
                scales.append(scaler.get_scale())
            else:  # DeepSpeed clips (grad_clip above), scales the loss (fp16) and steps itself
                before = wrapped.skipped_steps
                be.backward(loss.sum(), wrapped, sync=True)
                skipped.append(wrapped.skipped_steps > before)
                if precision == "fp16":
                    scales.append(float(wrapped.optimizer.loss_scale))
            ema.update(model)
            total = loss.detach().sum().clone()
            dist.all_reduce(total)
            losses.append(total.item())
            continue
        be.backward(loss.sum() * (float("nan") if step == 3 and rank == 0 else 1.0), wrapped, sync=True)  # step 3: NaN
        bad = be.step(wrapped, opt, clip)  # the clipped norm finds the NaN; the step is skipped
        if step == 3:
            assert bad.item() == 1
            break
        skipped.append(bool(bad.item()))
        ema.update(model)
        total = loss.detach().sum().clone()
        dist.all_reduce(total)
        losses.append(total.item())
    weights, ema_state = full_model_state(model), ema.full_state_dict()  # collectives: every rank
    if rank == 0:
        torch.save({"losses": losses, "skipped": skipped, "scales": scales, "weights": weights, "ema": ema_state}, out)


modes, out_dir = sys.argv[1].split(","), sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
for name in modes:  # one process pair for every mode: start-up and imports are paid once
    torch._dynamo.reset()
    run(name, os.path.join(out_dir, f"{name}.pt"))
dist.barrier()
dist.destroy_process_group()
# torch 2.14 on gloo, after FSDP2 + checkpoint: about one run in six aborted in C++ static destruction after all the
# work above was done ("terminate called without an active exception", no Python frame). Skip that teardown.
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)
