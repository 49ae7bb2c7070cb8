"""Throughput and memory of one backend over several settings, in ONE process per backend (docs/backends.md).

usage: torchrun --nproc_per_node N benchmarks/gpu/backend_matrix.py OUT BACKEND DATA640 DATA1280 SPEC... [--profile SPEC]
SPEC = precision:grad_ckpt:imgsz:batch[:loop], e.g. bf16:off:640:32:loop  fp16:all:640:32  bf16:off:1280:8
BACKEND = a backend, optionally with settings: fsdp  or  fsdp,reshard_after_forward=False  (the rows and files are
named by the whole word, `,` and `=` written `-`)

`yoloscale bench` starts a process per measurement, and each spent 100-136 s before its first step on the GPU
machine (process start, dataset, model, cuDNN autotuning): a backend x precision x grad_ckpt x resolution table
would not fit the device time we get. Here one process measures a backend's settings one after the other (the
Accelerator state is reset in between; cuDNN's autotuning is reused for repeated shapes):
- `loop`: our loop on the real loader (yolo11x, cache=ram), then the bare step on a resident batch (bench.py);
  without `loop`: the bare step only.
- peak memory reserved and allocated, for the measured batch;
- an estimate of the largest batch per GPU: allocated peak at the batch and at half of it (cuDNN autotuning off for
  both, so no new algorithms are tried), a straight line through the two, and the GPU's memory less 4 GiB of margin
  for the allocator's cache and the CUDA context. Estimated, not tried: an out-of-memory on one rank would hang
  the other in its all-reduce.
- `--profile SPEC`: torch.profiler over 6 bare steps; the top operators by GPU time and by host time, then the top
  Python functions of 4 more steps under cProfile, go to profile-BACKEND.txt.
Writes OUT/matrix-BACKEND.jsonl (one line per setting, rank 0), appended as each setting finishes.
"""

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from yoloscale.config import load_config
from yoloscale.speed.step_timing import loop_and_bare, measure_bare, peak_memory, resident_batches

WARMUP, WINDOW = 5, 4


def reset_between_settings() -> None:
    from accelerate.state import AcceleratorState, GradientState

    # PartialState too: it remembers the distributed type, and a second FSDP Accelerator then lacked its plugin.
    AcceleratorState._reset_state(reset_partial_state=True)  # the process group itself stays
    GradientState._reset_state()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def file_tag(backend: str) -> str:
    """`fsdp,reshard_after_forward=False` -> `fsdp-reshard_after_forward-False`, for file names."""
    return backend.replace(",", "-").replace("=", "-")


def half_batch(batch: dict, n: int) -> dict:
    """The first n images of a resident batch and their boxes."""
    keep = batch["batch_idx"] < n
    return {
        **batch,
        "img": batch["img"][:n],
        "batch_idx": batch["batch_idx"][keep],
        "cls": batch["cls"][keep],
        "bboxes": batch["bboxes"][keep],
    }


def peak_alloc_of_steps(trainer, batch: dict) -> float:
    """Allocated peak (GiB) over one accumulation window of bare steps on `batch`."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with resident_batches(trainer):
        for _ in range(trainer.schedule.accumulate):
            trainer.train_step(dict(batch))
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def max_batch_estimate(trainer, resident: dict, batch: int) -> dict:
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        full, half = (
            peak_alloc_of_steps(trainer, resident),
            peak_alloc_of_steps(trainer, half_batch(resident, batch // 2)),
        )
    finally:
        torch.backends.cudnn.benchmark = benchmark
    per_image = (full - half) / (batch - batch // 2)
    fixed = full - per_image * batch
    usable = torch.cuda.get_device_properties(0).total_memory / 2**30 - 4.0
    return {
        "alloc_GiB_at_batch": full,
        "alloc_GiB_at_half": half,
        "GiB_per_image": per_image,
        "fixed_GiB": fixed,
        "max_batch_est": int((usable - fixed) / per_image) if per_image > 0 else None,
    }


def measure(out: Path, backend: str, data: dict, spec: str) -> tuple:
    from yoloscale.training.trainer import Trainer

    precision, ckpt, imgsz, batch, *loop = spec.split(":")
    model = os.environ.get("MATRIX_MODEL", "yolo11x.yaml")  # a small one for the CPU smoke test
    name, *extra = backend.split(",")
    settings = [
        f"backend={name}",
        *extra,
        f"precision={precision}",
        f"grad_ckpt={ckpt}",
        f"imgsz={imgsz}",
        f"device_batch={batch}",
        "optimizer=SGD",
        f"model={model}",
        "workers=12",
        "cache=ram",
        f"data={data[int(imgsz) > 640]}",
        f"project={out / 'runs'}",
        f"name={file_tag(backend)}-{spec.replace(':', '-')}",
        "plots=False",
    ]
    trainer = Trainer(load_config(None, settings))
    row = {"backend": backend, "spec": spec}
    if loop:
        result, resident = loop_and_bare(trainer, WARMUP, WINDOW)
        row.update(result)
    else:
        trainer.model.train()
        trainer.train_loader.sampler.set_epoch(0)
        resident = trainer.prepare_batch(next(iter(trainer.train_loader)))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        row["bare"] = {**measure_bare(trainer, resident, WARMUP, WINDOW), **peak_memory()}
        row.update(
            devices=trainer.world, accumulate=trainer.schedule.accumulate, skipped_steps=trainer.health.skipped()
        )
    if torch.cuda.is_available():
        row["max_batch"] = max_batch_estimate(trainer, resident, int(batch))
    return row, trainer, resident


def profile(out: Path, backend: str, trainer, resident: dict) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with resident_batches(trainer):
        for _ in range(2):
            trainer.train_step(dict(resident))
        sync()
        t = time.perf_counter()
        with torch_profile(activities=activities) as prof:
            for _ in range(6):
                trainer.train_step(dict(resident))
            sync()
        wall = time.perf_counter() - t
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    events = prof.key_averages()
    # (Summing self device times over these rows counts kernels twice, under their op and as themselves: no "busy %".)
    head = (
        f"{backend}: 6 bare micro-steps of {trainer.device_batch} images per GPU, wall {wall * 1e3:.1f} ms profiled\n"
    )
    by_device = events.table(sort_by=key, row_limit=60, max_name_column_width=70)
    # and by the host's own time: a backend bound by its Python bookkeeping (ZeRO-3's hooks) shows there
    by_host = events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70)
    # and the Python side under cProfile (4 more steps): the backend's bookkeeping, and its waits for the GPU (a
    # host sync shows as the time of .item()/synchronize, which a queue-ahead step does not have)
    import cProfile
    import io
    import pstats

    with resident_batches(trainer):
        py = cProfile.Profile()
        py.enable()
        for _ in range(4):
            trainer.train_step(dict(resident))
        sync()
        py.disable()
    text = io.StringIO()
    pstats.Stats(py, stream=text).sort_stats("tottime").print_stats(35)
    (out / f"profile-{file_tag(backend)}.txt").write_text(
        f"{head}{by_device}\nby host time:\n{by_host}\ncProfile, 4 steps:\n{text.getvalue()}"
    )


def main() -> None:
    args = sys.argv[1:]
    prof_spec = args[args.index("--profile") + 1] if "--profile" in args else None
    if prof_spec:
        i = args.index("--profile")
        args = args[:i] + args[i + 2 :]
    out, backend, data640, data1280, *specs = args
    out = Path(out)
    data = {False: data640, True: data1280}  # by imgsz > 640
    rank0 = int(os.environ.get("RANK", "0")) == 0
    for spec in specs + ([prof_spec] if prof_spec and prof_spec not in specs else []):
        t = time.perf_counter()
        trainer = resident = None
        try:
            row, trainer, resident = measure(out, backend, data, spec)
            if spec == prof_spec:
                profile(out, backend, trainer, resident)
        except Exception as e:  # an out-of-memory or a backend failure is a result too; go on with the next one
            row = {
                "backend": backend,
                "spec": spec,
                "error": f"{type(e).__name__}: {str(e)[:300]}",
                "traceback": traceback.format_exc()[-2000:],
            }
        row["seconds"] = time.perf_counter() - t
        if rank0:
            with open(out / f"matrix-{file_tag(backend)}.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        del trainer, resident
        reset_between_settings()


if __name__ == "__main__":
    main()
