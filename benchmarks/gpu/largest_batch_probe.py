"""Ultralytics' largest training batch on this GPU: its AutoBatch (batch=-1, 60% of the memory) and by hand (the
largest batch whose training step runs: Ultralytics' recipe of fp16 autocast, GradScaler and AdamW (optimizer=auto's
choice for short runs), found by doubling then bisection, each try two steps).

    python benchmarks/gpu/largest_batch_probe.py OUT.json [MODEL] [IMGSZ]

Compare with `yoloscale plan model=MODEL imgsz=IMGSZ plan_for=batch` (and a real run at that batch).
"""

from __future__ import annotations

import json
import sys
import time

import torch
from time_model_probe import step_fn
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import IterableSimpleNamespace
from ultralytics.utils.autobatch import check_train_batch_size

from yoloscale.memory.measure import _batch


def fresh_model(name: str) -> DetectionModel:
    m = DetectionModel(name, nc=3, verbose=False).cuda()
    m.args = IterableSimpleNamespace(**vars(get_cfg()))
    return m


def fits(name: str, imgsz: int, n: int) -> tuple[bool, float]:
    """Whether two training steps at batch n run; and the reserved peak (GiB)."""
    model = step = batch = None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        model = fresh_model(name).train()
        step = step_fn(model, torch.device("cuda"), imgsz)  # fp16 autocast, GradScaler, AdamW, clipping
        batch = _batch(n, imgsz, torch.device("cuda"))
        for _ in range(2):
            step(batch)
        torch.cuda.synchronize()
        return True, torch.cuda.max_memory_reserved() / 2**30
    except torch.OutOfMemoryError:
        return False, torch.cuda.max_memory_reserved() / 2**30
    finally:
        del model, step, batch
        torch.cuda.empty_cache()


def main() -> None:
    out = sys.argv[1]
    name = sys.argv[2] if len(sys.argv) > 2 else "yolo11x.yaml"
    imgsz = int(sys.argv[3]) if len(sys.argv) > 3 else 1280
    t = time.perf_counter()
    auto = check_train_batch_size(fresh_model(name), imgsz, amp=True)
    result = {
        "model": name,
        "imgsz": imgsz,
        "device": torch.cuda.get_device_name(0),
        "autobatch": auto,
        "autobatch_s": time.perf_counter() - t,
        "tries": [],
    }
    lo, hi = 0, 1
    while True:  # doubling: lo fits, hi does not
        ok, peak = fits(name, imgsz, hi)
        result["tries"].append({"batch": hi, "fits": ok, "peak_GiB": peak})
        if not ok:
            break
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok, peak = fits(name, imgsz, mid)
        result["tries"].append({"batch": mid, "fits": ok, "peak_GiB": peak})
        lo, hi = (mid, hi) if ok else (lo, mid)
    result["by_hand"] = lo
    print(json.dumps(result, indent=1))
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
