"""Data for the planner's time model: the fit `yoloscale plan` makes, its predictions, and real steps beside them.

    python benchmarks/gpu/time_model_probe.py OUT.json [MODEL:IMGSZ:B1,B2,... ...]

For each case, on the first GPU: the planner's measurement (plan.measure) and, for grad_ckpt off/highres/all and
each batch, the predicted and the measured img/s and peak (a bare step as the trainer runs it: fp16 autocast,
GradScaler, AdamW, channels_last input; median of 6 timed steps after 3 warm-up steps), and each layer's forward GPU
time at two batches (CUDA events), which a time model can be fitted from.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import IterableSimpleNamespace

from yoloscale.memory.grad_ckpt import apply_grad_ckpt, remove_grad_ckpt, select_layers
from yoloscale.memory.measure import _batch, measure

CASES = [
    "yolo11x.yaml:640:8,16,32,48",
    "yolo11x.yaml:1280:2,4,8,16",
    "yolov8s.yaml:320:32,64,128,256",
    "yolov8s.yaml:1280:4,8,16,32",
]


def model_of(name: str, device) -> DetectionModel:
    m = DetectionModel(name, nc=10, verbose=False).to(device)
    m.args = IterableSimpleNamespace(**vars(get_cfg()))
    return m


def step_fn(model, device, imgsz):
    criterion = model.init_criterion()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler("cuda")

    def step(batch):
        with torch.autocast("cuda", dtype=torch.float16):
            preds = model(batch["img"])
        loss, _ = criterion(preds, batch)
        scaler.scale(loss.sum()).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def real(model, device, imgsz, n) -> dict:
    step = step_fn(model, device, imgsz)
    batch = _batch(n, imgsz, device)
    batch["img"] = batch["img"].contiguous(memory_format=torch.channels_last)
    try:
        for _ in range(3):
            step(batch)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(6):
            t = time.perf_counter()
            step(batch)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        s = statistics.median(times)
        return {
            "step_s": s,
            "img_s": n / s,
            "peak_reserved": torch.cuda.max_memory_reserved(),
            "peak_allocated": torch.cuda.max_memory_allocated(),
        }
    except torch.OutOfMemoryError:
        return {"oom": True}
    finally:
        del batch
        torch.cuda.empty_cache()


def layer_times(model, device, imgsz, n) -> list[float]:
    """Each layer's forward GPU time (ms) at batch n, fp16 autocast, training mode, with grad."""
    starts, ends, hooks = {}, {}, []
    for i, layer in enumerate(model.model):

        def pre(mod, args, i=i):
            starts.setdefault(i, []).append(torch.cuda.Event(enable_timing=True))
            starts[i][-1].record()

        def post(mod, args, out, i=i):
            ends.setdefault(i, []).append(torch.cuda.Event(enable_timing=True))
            ends[i][-1].record()

        hooks += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    x = torch.rand(n, 3, imgsz, imgsz, device=device).contiguous(memory_format=torch.channels_last)
    try:
        for _ in range(5):
            with torch.autocast("cuda", dtype=torch.float16):
                out = model(x)
            del out
        torch.cuda.synchronize()
        return [
            statistics.median(s.elapsed_time(e) for s, e in list(zip(starts[i], ends[i]))[2:])
            for i in range(len(model.model))
        ]
    finally:
        for h in hooks:
            h.remove()
        del x
        torch.cuda.empty_cache()


def main() -> None:
    out = sys.argv[1]
    cases = sys.argv[2:] or CASES
    device = torch.device("cuda", 0)
    torch.backends.cudnn.benchmark = True
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cases": []}
    for case in cases:
        name, imgsz, batches = case.split(":")
        imgsz, batches = int(imgsz), [int(b) for b in batches.split(",")]
        model = model_of(name, device)
        t = time.perf_counter()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        fit = measure(model, opt, device, "fp16", imgsz, device_name=results["device"])
        del opt
        fit_s = time.perf_counter() - t
        model = model_of(name, device)  # fresh: the fit's optimizer steps changed the weights
        rec = {
            "model": name,
            "imgsz": imgsz,
            "fit": json.loads(fit.to_json()),
            "fit_s": fit_s,
            "rows": [],
            "layer_ms": {},
        }
        for n in (batches[0], batches[-1]):
            rec["layer_ms"][n] = layer_times(model, device, imgsz, n)
        for choice in ("off", "highres", "all"):
            selection = select_layers(model, choice)
            apply_grad_ckpt(model, choice) if choice != "off" else None
            for n in batches:
                row = {
                    "grad_ckpt": choice,
                    "batch": n,
                    "pred_img_s": fit.img_s(n, imgsz, selection),
                    "pred_peak": fit.peak(n, imgsz, selection),
                }
                row.update(real(model, device, imgsz, n))
                rec["rows"].append(row)
                print(name, imgsz, json.dumps(row), flush=True)
            remove_grad_ckpt(model)
        results["cases"].append(rec)
        del model
        torch.cuda.empty_cache()
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
