"""Per layer, what checkpointing it alone really saves and costs, measured on the GPU (data for the planner).

    python benchmarks/gpu/layer_savings_probe.py OUT.json [MODEL:IMGSZ:N1,N2 ...]

For each case: the bare training step (time_model_probe.py's) with no layer checkpointed, with each layer alone, with
the highres layers and with all, each at batches N1 and N2: peak allocated bytes and the median step time of 3 steps
(after 2 warm-up steps). Also 'all' at batches 2 and 6, where the planner measures today.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from time_model_probe import model_of, step_fn

from yoloscale.memory.grad_ckpt import apply_grad_ckpt, remove_grad_ckpt
from yoloscale.memory.measure import _batch

CASES = ["yolo11x.yaml:640:16,32", "yolo11x.yaml:1280:4,8", "yolov8s.yaml:640:32,64"]


def measure(model, step, device, imgsz, n) -> dict:
    batch = _batch(n, imgsz, device)
    batch["img"] = batch["img"].contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        step(batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        step(batch)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"n": n, "step_s": statistics.median(times), "peak_allocated": torch.cuda.max_memory_allocated()}


def main() -> None:
    out, cases = sys.argv[1], sys.argv[2:] or CASES
    device = torch.device("cuda", 0)
    torch.backends.cudnn.benchmark = True
    results = {"device": torch.cuda.get_device_name(0), "cases": []}
    for case in cases:
        name, imgsz, batches = case.split(":")
        imgsz, batches = int(imgsz), [int(b) for b in batches.split(",")]
        model = model_of(name, device)
        step = step_fn(model, device, imgsz)
        rec = {"model": name, "imgsz": imgsz, "rows": []}
        choices = ["off"] + [str(i) for i in range(len(model.model))] + ["highres", "all"]
        for choice in choices:
            if choice != "off":
                apply_grad_ckpt(model, choice)
            rec["rows"].append({"grad_ckpt": choice, "at": [measure(model, step, device, imgsz, n) for n in batches]})
            print(name, imgsz, json.dumps(rec["rows"][-1]), flush=True)
            remove_grad_ckpt(model)
        apply_grad_ckpt(model, "all")
        rec["all_small"] = [measure(model, step, device, imgsz, n) for n in (2, 6)]
        remove_grad_ckpt(model)
        results["cases"].append(rec)
        del model, step
        torch.cuda.empty_cache()
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
