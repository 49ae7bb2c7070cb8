"""DeepSpeed ZeRO checkpoints across world sizes (backend/zero_reshard.py), on the CPU over gloo, for
test_zero_reshard.py.
usage: torchrun --nproc_per_node N zero_reshard_worker.py zero2|zero3 SGD|AdamW save|load DIR

save: two steps of yolov8n, a DeepSpeed checkpoint in DIR/ckpt, the full weights, buffers and optimizer states
      (DeepSpeed's safe_get_full_* API) in DIR/saved.pt, then a third step: DIR/next-N.pt.
load: a fresh engine on this world size, `load_resharded` from DIR/ckpt, the same full tensors in DIR/loaded-N.pt,
      then the third step: DIR/resumed-N.pt. The global batch is 8 images however many ranks share it.
"""

import os
import sys

import torch
import torch.distributed as dist

from yoloscale.backend.deepspeed import gather_whole_layers, render_ds_config
from yoloscale.backend.zero_reshard import load_resharded
from yoloscale.config import load_config
from yoloscale.data import ultralytics_args
from yoloscale.model import build_model
from yoloscale.optim import build_optimizer

os.environ.setdefault("YOLO_OFFLINE", "1")
backend, optimizer_name, phase, out = sys.argv[1:5]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()

import deepspeed  # noqa: E402  (after the process group: DeepSpeed then reuses it)
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402

torch.Tensor.record_stream = lambda self, stream: None  # DeepSpeed calls this CUDA-only method on the CPU too
torch.manual_seed(0 if phase == "save" else 1)  # the loaded run starts from other weights: the load must replace them
cfg = load_config(None, ["model=yolov8n.yaml", "imgsz=64", f"optimizer={optimizer_name}"])
model = build_model("yolov8n.yaml", 3, {0: "a", 1: "b", 2: "c"}, ultralytics_args(cfg, "unused.yaml"))
if backend == "zero3":
    gather_whole_layers(model)
ds = render_ds_config(load_config(None, [f"backend={backend}", f"batch={8 // world}", "grad_clip=10"]), "fp32", 1, world)
engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(cfg, model, lr=0.01, fused=False), config=ds)
criterion = model.init_criterion()
images = torch.rand(3, 8, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def step(i: int) -> float:
    n = 8 // world
    mine = slice(n * rank, n * rank + n)
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.3]]).repeat(n, 1)
    batch = {"img": images[i, mine], "batch_idx": torch.arange(n).float(), "cls": torch.zeros(n, 1), "bboxes": boxes}
    loss, _ = criterion(engine(images[i, mine]), batch)
    engine.backward(loss.sum())
    engine.step()
    total = loss.detach().sum().clone()
    dist.all_reduce(total)
    return total.item()


def full_state() -> dict:
    """Every tensor a resumed run needs, whole, and the engine's counters."""
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):  # ZeRO-1/2: see load_resharded on DeepSpeed's late linking
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    keys = ["momentum_buffer"] if optimizer_name == "SGD" else ["exp_avg", "exp_avg_sq"]
    state = {f"buffer:{n}": b.clone() for n, b in model.named_buffers()}
    for n, p in model.named_parameters():
        if p.requires_grad:
            state[f"weight:{n}"] = safe_get_full_fp32_param(p).cpu()
            state.update({f"{k}:{n}": safe_get_full_optimizer_state(p, k).cpu() for k in keys})
    steps = [g.get("step") for g in opt.optimizer.state.values()]
    return {"state": state, "counters": [engine.global_steps, engine.global_samples, engine.skipped_steps, steps]}


if phase == "save":
    losses = [step(0), step(1)]
    engine.save_checkpoint(os.path.join(out, "ckpt"), "pytorch_model")
    saved = full_state()
    result = {"losses": losses + [step(2)], "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}
    names = {"saved.pt": saved, f"next-{world}.pt": result}
else:
    load_resharded(engine, os.path.join(out, "ckpt"), "pytorch_model")
    loaded = full_state()
    result = {"losses": [step(2)], "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}
    names = {f"loaded-{world}.pt": loaded, f"resumed-{world}.pt": result}
if backend == "zero3":  # gather the weights (collective: every rank)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        result["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
if rank == 0:
    for name, value in names.items():
        torch.save(value, os.path.join(out, name))
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)  # see sharded_parity_worker.py: skip torch's C++ teardown
