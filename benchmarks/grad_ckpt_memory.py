"""Activation memory and step time of grad_ckpt on the CPU (docs/backends.md): one process per setting.

usage: MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072 \\
       python benchmarks/grad_ckpt_memory.py off|all|cheap [LAYERS] [MODEL] [IMGSZ] [BATCH]
       (defaults: every layer, i.e. grad_ckpt=all; yolo11x.yaml; 640; 2)

Three forward + backward steps of an Ultralytics model, the LAYERS (a grad_ckpt= value: all, backbone, 0-4, ...)
checkpointed unless `off`, recompute `all` or `cheap` (grad_ckpt.py). glibc serves tensors above the threshold with mmap and returns them on free, so the resident
set follows the live tensors: "after forward" is what the forward left saved for the backward, "peak" the largest
growth during the steps (the recomputation included), both over the resident set before the first step. Prints one
line; the CPU's step times say what is recomputed, not what a GPU would take.
"""

import os
import resource
import sys
import time

import torch

os.environ.setdefault("YOLO_OFFLINE", "1")
from yoloscale.config import load_config
from yoloscale.memory.grad_ckpt import apply_grad_ckpt
from yoloscale.training.data import ultralytics_args
from yoloscale.training.model import build_model


def resident_gib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def main(
    recompute: str, layers: str = "all", model_yaml: str = "yolo11x.yaml", imgsz: int = 640, batch: int = 2
) -> None:
    torch.manual_seed(0)
    cfg = load_config(None, [f"model={model_yaml}", f"imgsz={imgsz}"])
    model = build_model(model_yaml, 3, {0: "a", 1: "b", 2: "c"}, ultralytics_args(cfg, "unused.yaml")).train()
    if recompute != "off":
        apply_grad_ckpt(model, layers, recompute)
    criterion = model.init_criterion()
    g = torch.Generator().manual_seed(1)
    base, saved, times = resident_gib(), 0.0, []
    for _ in range(3):
        images = torch.rand(batch, 3, imgsz, imgsz, generator=g)
        labels = {
            "img": images,
            "batch_idx": torch.arange(batch).float(),
            "cls": torch.zeros(batch, 1),
            "bboxes": torch.rand(batch, 4, generator=g) * 0.3 + 0.3,
        }
        start = time.perf_counter()
        loss, _ = criterion(model(images), labels)
        saved = max(saved, resident_gib() - base)
        loss.sum().backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - base
    print(
        f"{model_yaml} {imgsz} px batch {batch}, grad_ckpt={layers if recompute != 'off' else 'off'} recompute={recompute}: saved after forward {saved:.2f} GiB, "
        f"peak growth {peak:.2f} GiB, step s {' '.join(f'{t:.2f}' for t in times)} (last two: steady), "
        f"loss {float(loss.sum()):.4f}"
    )


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:4], *map(int, sys.argv[4:6]))
