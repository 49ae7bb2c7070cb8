"""The memory model against the measured peak, on the CPU, for test_plan.py. Run with glibc told to hand freed
memory back (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), so the resident peak follows the tensors.
usage: plan_accuracy.py MODEL IMGSZ BATCH  -> one JSON line: the fit's predictions and the measured peaks"""

import copy
import json
import sys

import torch

from yoloscale.config import load_config
from yoloscale.memory.grad_ckpt import apply_grad_ckpt
from yoloscale.memory.measure import _batch, _peak, _reset_peak, measure
from yoloscale.training.data import ultralytics_args
from yoloscale.training.model import build_model
from yoloscale.training.optim import OptimizerChoice, build_optimizer

torch.set_num_threads(1)
name, imgsz, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = load_config(None, [f"model={name}", f"imgsz={imgsz}"])
base = build_model(name, 3, {0: "a", 1: "b", 2: "c"}, ultralytics_args(cfg, "unused.yaml"))
device = torch.device("cpu")
choice = OptimizerChoice("AdamW", 1e-3, 0.9, 0.0)
probe = copy.deepcopy(base)
fit = measure(probe, build_optimizer(probe, choice, 0.0, fused=False), device, "fp32", imgsz, batches=(4, 16))
del probe
out = {}
for selection in ("off", "all"):
    model = copy.deepcopy(base)
    layers = apply_grad_ckpt(model, selection)
    opt = build_optimizer(model, choice, 0.0, fused=False)
    criterion = model.init_criterion()
    model.train()

    def step(n, model=model, opt=opt, criterion=criterion):
        b = _batch(n, imgsz, device)
        loss, _ = criterion(model(b["img"]), b)
        loss.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(1)
    _reset_peak(device)
    step(1)
    one = _peak(device)[0]
    _reset_peak(device)
    step(batch)
    peak = _peak(device)[0]
    out[selection] = {
        "measured_growth": peak - one,
        "predicted_growth": fit.peak(batch, imgsz, layers) - fit.peak(1, imgsz, layers),
    }
    del model, opt, step
print(json.dumps(out))
