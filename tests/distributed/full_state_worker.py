"""Checkpoints across backends and world sizes (backend/full_state.py, zero_reshard.py), on the CPU over gloo, for
test_full_state.py.
usage: torchrun --nproc_per_node N full_state_worker.py ddp|fsdp|zero2|zero3[+OFFLOAD] SGD|AdamW save DIR
       torchrun --nproc_per_node N full_state_worker.py ddp|fsdp|zero2|zero3[+OFFLOAD] SGD|AdamW load DIR SAVED_BY
(zero2+optimizer, zero3+params: DeepSpeed with offload=optimizer / params, the optimizer stepping in CPU memory)

save: two steps of yolov8n, the checkpoint in the layout Accelerate's save_state writes for the backend (DDP through
      Accelerate itself; FSDP2 through Accelerate's save_fsdp_model/optimizer; ZeRO through the engine, as Accelerate
      calls it), the whole weights and optimizer states in DIR/saved.pt, then a third step: DIR/next-BACKEND-N.pt.
load: this backend on this world size, the checkpoint loaded through whole tensors (DDP: full_state.load_foreign as
      the trainer calls it), the same whole tensors in DIR/loaded-BACKEND-N.pt, the third step in
      DIR/resumed-BACKEND-N.pt. The global batch is 8 images however many ranks share it.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from yoloscale.backend.fsdp import enable_fused_sgd, fsdp_plugin, shard_model
from yoloscale.backend.full_state import load_foreign, optimizer_names, read_full_state, write_full_state
from yoloscale.backend.zero import gather_whole_layers, render_ds_config
from yoloscale.config import load_config
from yoloscale.training.data import ultralytics_args
from yoloscale.training.model import build_model
from yoloscale.training.optim import OptimizerChoice, build_optimizer

os.environ.setdefault("YOLO_OFFLINE", "1")
spec, optimizer_name, phase, out = sys.argv[1:5]
backend, _, offload = spec.partition("+")
ckpt = Path(out) / "ckpt"
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0 if phase == "save" else 1)  # a loaded run starts from other weights: the load must replace them
cfg = load_config(None, ["model=yolov8n.yaml", "imgsz=64", f"optimizer={optimizer_name}", f"backend={backend}"])
model = build_model("yolov8n.yaml", 3, {0: "a", 1: "b", 2: "c"}, ultralytics_args(cfg, "unused.yaml"))
choice = OptimizerChoice(optimizer_name, lr0=0.01, momentum=0.937, warmup_bias_lr=0.1)
fused = optimizer_name == "SGD"  # AdamW: foreach everywhere, as DeepSpeed's, so that next steps compare closely
engine = accelerator = None
if backend.startswith("zero"):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    torch.Tensor.record_stream = lambda self, stream: None  # DeepSpeed calls this CUDA-only method on the CPU too
    if backend == "zero3":
        gather_whole_layers(model)
    ds_cfg = load_config(
        None, [f"backend={backend}", f"batch={8 // world}", "grad_clip=10", f"offload={offload or 'none'}"]
    )
    ds = render_ds_config(ds_cfg, "fp32", 8 // world, world)
    opt = build_optimizer(model, choice, 5e-4, fused=False)
    names = optimizer_names(model, opt)
    engine, opt, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    wrapped = engine
elif backend == "fsdp":
    wrapped = shard_model(model)
    opt = build_optimizer(model, choice, 5e-4, fused=fused and enable_fused_sgd())
    names = optimizer_names(model, opt)
else:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    opt = build_optimizer(model, choice, 5e-4, fused=fused)
    names = optimizer_names(model, opt)
    wrapped, opt = accelerator.prepare(model, opt)
criterion = model.init_criterion()
images = torch.rand(3, 8, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def step(i: int) -> float:
    n = 8 // world
    mine = slice(n * rank, n * rank + n)
    batch = {
        "img": images[i, mine],
        "batch_idx": torch.arange(n).float(),
        "cls": torch.zeros(n, 1),
        "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]]).repeat(n, 1),
    }
    loss, _ = criterion(wrapped(images[i, mine]), batch)
    if engine is not None:  # DeepSpeed clips (grad_clip=10) and steps itself
        engine.backward(loss.sum())
        engine.step()
    else:
        loss.sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    total = loss.detach().sum().clone()
    dist.all_reduce(total)
    return total.item()


def whole() -> dict:
    """Every weight, buffer and per-parameter optimizer state, whole (collective)."""
    if engine is not None:
        if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):  # see zero_reshard.write_zero
            engine.optimizer._hp_optimizer_states_linked = False
            engine.optimizer._lazy_init_hp_params_optimizer_state()
        keys = ["momentum_buffer"] if optimizer_name == "SGD" else ["exp_avg", "exp_avg_sq"]
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        state = {f"weight:{n}": safe_get_full_fp32_param(p).cpu() for n, p in trainable}
        state.update({f"{k}:{n}": safe_get_full_optimizer_state(p, k).cpu() for n, p in trainable for k in keys})
        steps = [st.get("step") for st in engine.optimizer.optimizer.state.values()]  # one per group
        steps = [s.clone() if torch.is_tensor(s) else s for s in steps]  # torch increments it in place
        state.update(
            {
                f"step:{n}": steps[g]
                for g, group in enumerate(names)
                for n in group
                if f"weight:{n}" in state and steps[g] is not None
            }
        )
        return state
    raw = model
    opts = StateDictOptions(full_state_dict=True)
    state = {
        f"weight:{n}": t.clone()
        for n, t in get_model_state_dict(raw, options=opts).items()
        if "running" not in n and "num_batches" not in n and dict(raw.named_parameters())[n].requires_grad
    }
    for n, st in get_optimizer_state_dict(raw, opt.optimizer if accelerator else opt, options=opts)["state"].items():
        state.update({f"{k}:{n}": v.cpu().clone() for k, v in st.items()})  # not views of the live tensors
    return state


if phase == "save":
    losses = [step(0), step(1)]
    if accelerator is not None:
        accelerator.save_state(str(ckpt))
    elif engine is not None:
        engine.save_checkpoint(str(ckpt), "pytorch_model")
    else:
        from accelerate import PartialState
        from accelerate.utils import save_fsdp_model, save_fsdp_optimizer

        plugin = fsdp_plugin(cfg)
        save_fsdp_model(plugin, PartialState(), model, str(ckpt), 0)
        save_fsdp_optimizer(plugin, PartialState(), opt, model, str(ckpt), 0)
    files = {"saved.pt": whole()}
    result = {"losses": losses + [step(2)]}
    tag = f"next-{spec}-{world}.pt"
else:
    saved_by = sys.argv[5].partition("+")[0]
    if accelerator is not None:
        load_foreign(accelerator, ckpt, saved_by, wrapped, opt, names)
    else:
        write_full_state(model, opt, read_full_state(ckpt, saved_by, names), names, engine)
    files = {f"loaded-{spec}-{world}.pt": whole()}
    result = {"losses": [step(2)]}
    tag = f"resumed-{spec}-{world}.pt"
weights = whole()  # after the third step
result["weights"] = {k: v for k, v in weights.items() if k.startswith("weight:")}
files[tag] = result
if rank == 0:
    for name, value in files.items():
        torch.save(value, os.path.join(out, name))
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)  # see sharded_parity_worker.py: skip torch's C++ teardown
