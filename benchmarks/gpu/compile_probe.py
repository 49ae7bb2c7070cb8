"""What torch.compile does to our training step on a GPU: compile time, recompilations and graph breaks, and the
steady-state speed against eager, in one process (docs/benchmarks.md).

usage: [TORCH_LOGS=recompiles_verbose,graph_breaks] python benchmarks/gpu/compile_probe.py OUT TAG [key=value ...]
           [--cl-params] [--mode MODE] [--profile]
       (or under `torchrun --nproc_per_node 1`, as `yoloscale bench` runs our loop; the JSON's "ddp" says whether the
       trainer got a DDP wrapper: with one process it did not, on one H200, 2026-11-24)
- the trainer is built as `yoloscale train` builds it, from the key=value settings (compile=True for the compiled
  step); the bare step (bench.py) then runs on one resident batch;
- the first FIRST steps are timed one by one (a CUDA synchronisation after each): the compilation shows there;
  then 3 windows of WINDOW steps give the steady img/s (median);
- --cl-params: the model's parameters in channels_last too (the input already is), before DDP builds its buckets;
- --mode: torch.compile's mode (default, reduce-overhead, max-autotune-no-cudagraphs) for compile=True;
- --profile: then torch.profiler over 4 steps: OUT/profile-TAG.txt (top kernels by GPU time) and the GPU-busy
  share of the wall time (the sum of kernel times over the steps' wall time; below 1 the GPU waits for the host).
Writes OUT/compile-TAG.json and prints one line.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

FIRST, WINDOW = 12, 10


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("tag")
    p.add_argument("settings", nargs="*")
    p.add_argument("--cl-params", action="store_true")
    p.add_argument("--mode", default=None)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()

    from yoloscale import backend
    from yoloscale.config import load_config
    from yoloscale.speed.step_timing import resident_batches
    from yoloscale.training.trainer import Trainer

    wrap = backend.Backend.wrap
    if a.cl_params:
        backend.Backend.wrap = lambda self, acc, model: wrap(self, acc, model.to(memory_format=torch.channels_last))
    if a.mode:
        compile_in_place = torch.nn.Module.compile
        torch.nn.Module.compile = lambda self, **kw: compile_in_place(self, mode=a.mode, **kw)
    if a.mode == "reduce-overhead":
        # CUDA graphs reuse their output memory: without a step mark the backward found its saved forward outputs
        # overwritten (one H200, 2026-11-24). One mark per micro-step, before the forward.
        step = Trainer.train_step
        Trainer.train_step = lambda self, batch: (torch.compiler.cudagraph_mark_step_begin(), step(self, batch))[1]

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)  # the CPU only to try the script
    t0 = time.perf_counter()
    trainer = Trainer(load_config(None, a.settings))
    if a.mode == "reduce-overhead":
        # and gradients that exist before the first backward, zeroed in place: autograd would otherwise keep the
        # backward graph's output buffer as .grad, which the next micro-step's replay overwrites
        for param in trainer.raw_model.parameters():
            param.grad = torch.zeros_like(param)
        zero_grad = trainer.optimizer.zero_grad
        trainer.optimizer.zero_grad = lambda set_to_none=True: zero_grad(set_to_none=False)
    resident = trainer.prepare_batch(next(iter(trainer.train_loader)))
    sync()
    built = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [time.perf_counter()]
    with resident_batches(trainer):
        for i in range(FIRST + 3 * WINDOW):
            trainer.train_step(dict(resident))
            if i < FIRST or (i - FIRST + 1) % WINDOW == 0:
                sync()
            times.append(time.perf_counter())
    images = trainer.batch
    first = [b - a for a, b in zip(times, times[1 : FIRST + 1])]
    marks = times[FIRST::WINDOW]
    rates = [WINDOW * images / (b - a) for a, b in zip(marks, marks[1:])]
    from torch._dynamo.utils import counters

    result = {
        "tag": a.tag,
        "settings": a.settings,
        "cl_params": a.cl_params,
        "mode": a.mode,
        "world": trainer.world,
        "ddp": isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel),
        "build_s": built,
        "first_steps_s": first,
        "img_s": statistics.median(rates),
        "windows": rates,
        "peak_GiB": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
        "dynamo": {k: dict(v) for k, v in counters.items() if v},
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }
    if a.profile:
        result["gpu_busy"] = profile(trainer, resident, a.out / f"profile-{a.tag}.txt")
    if trainer.is_main:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"compile-{a.tag}.json").write_text(json.dumps(result, indent=1, default=str))
        print(
            f"{a.tag}: {result['img_s']:.1f} img/s, first steps {[round(s, 1) for s in first[:4]]} s, "
            f"peak {result['peak_GiB']:.1f} GiB, ddp={result['ddp']}, "
            f"unique graphs {counters['stats'].get('unique_graphs')}, graph breaks {sum(counters['graph_break'].values())}",
            flush=True,
        )


def profile(trainer, resident: dict, path: Path, steps: int = 4) -> float:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from yoloscale.speed.step_timing import resident_batches

    with resident_batches(trainer), torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(dict(resident))
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t) * 1e6
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / wall_us  # overlapping streams could count twice: NCCL is not used here
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"{steps} steps, wall {wall_us / 1e3:.1f} ms, GPU kernels {busy:.3f} of it\n"
        + prof.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=70)
    )
    return busy


if __name__ == "__main__":
    main()
