"""How much a CUDA graph of the model's forward and backward would gain on one GPU: Ultralytics' DetectionModel, its
loss (eager, outside the graph: its target assignment has data-dependent shapes), fp16 autocast + GradScaler, fused
SGD, channels_last input, resident tensors. Prints ms per step (median of windows) for eager and graphed.

    python benchmarks/gpu/graph_probe.py [MODEL.yaml] [IMGSZ] [BATCH]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten


def batch_of(b: int, nc: int, per_image: int = 8) -> dict:
    n = b * per_image
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.2 + 0.05
    return {
        "batch_idx": torch.arange(b).repeat_interleave(per_image).float().cuda(),
        "cls": torch.randint(0, nc, (n, 1), generator=g).float().cuda(),
        "bboxes": torch.cat([xy, wh], 1).cuda(),
    }


class Flat(torch.nn.Module):
    """The model with its outputs flattened to a tuple of tensors (what a graphed callable returns)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.spec = model, None

    def forward(self, x):
        flat, self.spec = tree_flatten(self.model(x))
        return tuple(flat)


def timed(step, n: int = 60, warmup: int = 15, window: int = 10) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    marks = [time.perf_counter()]
    for i in range(n):
        step()
        if (i + 1) % window == 0:
            torch.cuda.synchronize()
            marks.append(time.perf_counter())
    return statistics.median((b - a) / window * 1e3 for a, b in zip(marks, marks[1:]))


def main() -> None:
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    name = sys.argv[1] if len(sys.argv) > 1 else "yolo11x.yaml"
    imgsz = int(sys.argv[2]) if len(sys.argv) > 2 else 640
    b = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    nc = 8
    torch.backends.cudnn.benchmark = True
    results = {}
    for mode in ("eager", "graphed"):
        torch.manual_seed(0)
        model = DetectionModel(name, nc=nc, verbose=False).cuda().train()
        model.args = get_cfg()
        criterion = model.init_criterion()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, fused=True)
        scaler = torch.amp.GradScaler(init_scale=2.0**10)
        img = torch.rand(b, 3, imgsz, imgsz, device="cuda").contiguous(memory_format=torch.channels_last)
        batch = batch_of(b, nc)
        flat = Flat(model)
        if mode == "graphed":
            with torch.autocast("cuda", torch.float16, cache_enabled=False):
                graphed = torch.cuda.make_graphed_callables(flat, (img,), num_warmup_iters=3)

            def forward():
                return tree_unflatten(list(graphed(img)), flat.spec)
        else:

            def forward():
                return model(img)

        def step():
            with torch.autocast("cuda", torch.float16, cache_enabled=False):
                preds = forward()
                loss, _ = criterion(preds, batch)
            scaler.scale(loss.sum()).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0, foreach=True)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

        ms = timed(step)
        results[mode] = ms
        print(f"{name} {imgsz} b{b} {mode}: {ms:.1f} ms/step, {b / ms * 1e3:.1f} img/s", flush=True)
        torch.cuda.empty_cache()
    print(f"graphed / eager speed: {results['eager'] / results['graphed']:.3f}x")


if __name__ == "__main__":
    main()
