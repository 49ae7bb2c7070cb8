"""What a run is built from, one function per part, in the order `Trainer.__init__` calls them: the devices and the
backend, the run directory, the data's description, the model with its initial weights, the batch (planned on the
device for batch=auto: memory/planner.py), and the data sets."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from types import SimpleNamespace

from accelerate.utils import broadcast_object_list
from torch import nn

from yoloscale import backend
from yoloscale.backend import Backend
from yoloscale.config import TrainConfig
from yoloscale.distributed.devices import distributed_env_from_slurm
from yoloscale.training.data import build_dataset, check_dataset, synthetic_dataset, ultralytics_args
from yoloscale.training.model import build_model, model_spec
from yoloscale.training.pretrained import initial_weights
from yoloscale.training.run_dir import RunLock, lock_run_dir, new_run_dir, read_run_info
from yoloscale.training.run_plan import requested_device_batch, validation_batch


def devices(cfg: TrainConfig) -> tuple[Backend, object, int]:
    """(the backend, its Accelerator, the batch per device the settings ask for: 0 for batch=auto, planned later)."""
    distributed_env_from_slurm()  # under srun: RANK, WORLD_SIZE, ... from Slurm's variables
    world = int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's; Accelerate reads the same variable
    requested = requested_device_batch(cfg, world)
    run_backend = backend.get(cfg)
    return run_backend, run_backend.build_accelerator(requested or 1), requested


def run_directory(cfg: TrainConfig, accelerator) -> tuple[Path, RunLock | None, str]:
    """Collective. (the run directory, rank 0's exclusive lock on it for the run's life, the job's id). A fresh run's
    directory is claimed by rank 0 (never onto one that holds results) and shared with the others."""
    run, lock = [Path(cfg.project) / cfg.name, uuid.uuid4().hex], None
    if accelerator.is_main_process:
        run[0], lock = (run[0], lock_run_dir(run[0])) if cfg.resume else new_run_dir(cfg)
    run_dir, job = broadcast_object_list(run) if accelerator.num_processes > 1 else run
    return run_dir, lock, job


def data_description(cfg: TrainConfig, accelerator) -> tuple[dict, Path, SimpleNamespace]:
    """(the checked data.yaml as a dict, its path, Ultralytics' argument namespace). data=synthetic writes the
    built-in set first (rank 0; the others wait)."""
    if cfg.data == "synthetic":
        data_yaml = synthetic_dataset(Path(cfg.project), accelerator.is_main_process, accelerator.wait_for_everyone)
    else:
        data_yaml = Path(cfg.data).resolve()
    data = check_dataset(data_yaml)
    if cfg.single_cls:  # Ultralytics' meaning: one class, named 'item' (its datasets map every label to it)
        data = {**data, "names": {0: "item"}, "nc": 1}
    return data, data_yaml, ultralytics_args(cfg, data_yaml)


def model(
    cfg: TrainConfig, data: dict, args: SimpleNamespace, run_dir: Path, is_main: bool
) -> tuple[str | dict, nn.Module, str, int]:
    """(what the model is built from, the model with its initial weights, the report of those weights, the class
    count of the weights it was fine-tuned from when their wider class branches were kept: pretrained.py)."""
    spec = model_spec(cfg.model, cfg.trust_pickle)
    # a resumed run rebuilds the class-branch widths its first start chose
    head_nc = read_run_info(run_dir).get("head_nc", 0) if cfg.resume else 0
    built = build_model(spec, data["nc"], data["names"], args, is_main, cfg.trust_pickle, head_nc)
    report = ""
    if not cfg.resume:
        report, head_nc = initial_weights(
            built, cfg.model, cfg.weights, cfg.trust_pickle, cfg.pretrained, cfg.cls_remap
        )
    return spec, built, report, head_nc


def datasets(
    cfg: TrainConfig, args: SimpleNamespace, data: dict, device_batch: int, planned: bool, world: int, stride: int
) -> tuple[object, object, int]:
    """(the train set, the val set, the per-device batch). A planned batch (batch=auto) larger than a small data set
    allows is cut to what each device's share holds."""
    train_set = build_dataset(args, data, "train", device_batch, stride)
    if planned and device_batch > len(train_set) // world:
        device_batch = max(len(train_set) // world, 1)
        if cfg.rect:  # rect's shape groups are of the batch the set was built with
            train_set = build_dataset(args, data, "train", device_batch, stride)
    val_set = build_dataset(args, data, "val", validation_batch(cfg, device_batch), stride)
    return train_set, val_set, device_batch
