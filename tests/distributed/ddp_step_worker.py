"""One optimizer step of the real Trainer on a fixed batch, for test_ddp.py.

usage: [torchrun --nproc_per_node N] ddp_step_worker.py DATA_YAML OUT_FILE PROJECT WEIGHTS
With N processes each rank takes the same 4 images; one process takes those 4 images twice (8). BatchNorm runs in
eval mode so the comparison is exact up to float summation order. WEIGHTS are trained ones: at initialisation
Ultralytics' loss clamps its normaliser (target_scores_sum >= 1), which makes a half batch's loss non-additive.
"""

import copy
import sys

import torch

from yoloscale.config import load_config
from yoloscale.training.data import build_dataset
from yoloscale.training.trainer import Trainer

data_yaml, out, project, weights = sys.argv[1:5]
world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
per_rank = 8 // world
cfg = load_config(
    None,
    [
        f"data={data_yaml}",
        "model=yolov8n.yaml",
        "imgsz=96",
        "batch=8",
        "nbs=16",
        "accumulate=1",
        "optimizer=SGD",
        "workers=0",
        "ema=False",
        "warmup_epochs=0",
        f"project={project}",
        f"name=w{world}",
        "plots=False",
        f"weights={weights}",
    ],
)
trainer = Trainer(cfg)
images = build_dataset(trainer.args, trainer.data, "val", 4, 32)
items = [images[i] for i in range(4)]
batch = images.collate_fn([copy.deepcopy(x) for x in items * (per_rank // 4)])  # collate edits items in place
for m in trainer.model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.eval()  # frozen statistics: per-rank batch statistics would differ from the full batch's
before = {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}
assert trainer.train_step(batch)
if trainer.is_main:
    torch.save({"before": before, "after": trainer.raw_model.state_dict()}, out)
trainer.accelerator.wait_for_everyone()
