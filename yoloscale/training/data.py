"""Data: resolve a data.yaml, and build Ultralytics' datasets (its augmentation, unchanged) behind resumable loaders.

We reuse Ultralytics' `check_det_dataset`, `build_yolo_dataset` (mosaic, mixup, HSV, flips, letterbox...) and its
collate function. The loader itself is a plain torch DataLoader over `ShardSampler`, which gives each rank a
disjoint shard, reshuffles per epoch from the seed alone, and can start an epoch part-way through (resume); its
epochs come back to back from one iterator (`TrainLoader`), so no epoch starts by waiting for the workers.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset, Sampler
from ultralytics.cfg import get_cfg
from ultralytics.data.build import build_dataloader, build_yolo_dataset, seed_worker
from ultralytics.data.utils import check_det_dataset, load_dataset_cache_file

from yoloscale.config import TrainConfig
from yoloscale.errors import UserError, warn
from yoloscale.training.synth import write_synthetic_dataset

# Our fields that Ultralytics' dataset, augmentation and loss read under the same names.
_ULTRALYTICS_KEYS = (
    "imgsz",
    "cache",
    "close_mosaic",
    "mosaic",
    "mixup",
    "cutmix",
    "copy_paste",
    "copy_paste_mode",
    "bgr",
    "fraction",
    "single_cls",
    "hsv_h",
    "hsv_s",
    "hsv_v",
    "degrees",
    "translate",
    "scale",
    "shear",
    "perspective",
    "flipud",
    "fliplr",
    "box",
    "cls",
    "dfl",
    "dis",
    "batch",
    "epochs",
    "optimizer",
    "lr0",
    "lrf",
    "momentum",
    "weight_decay",
    "warmup_epochs",
    "warmup_momentum",
    "warmup_bias_lr",
    "nbs",
    "cos_lr",
    "seed",
    "deterministic",
    "workers",
    "patience",
    "multi_scale",
    "cls_pw",
    "exist_ok",
    "rect",
)


def ultralytics_args(cfg: TrainConfig, data_yaml: str | Path, **extra: Any) -> SimpleNamespace:
    """Ultralytics' full argument namespace (its defaults) with our values filled in.

    Datasets read augmentation from it, the loss reads box/cls/dfl gains from `model.args`, and exported
    checkpoints store it as `train_args`, so `YOLO(best.pt)` sees a consistent record of the run.
    """

    overrides = {k: getattr(cfg, k) for k in _ULTRALYTICS_KEYS}
    overrides.update(cache=cfg.cache or False, task="detect", mode="train", model=cfg.model, data=str(data_yaml))
    # Ultralytics' "not set" is None
    overrides.update(time=cfg.time or None, device=cfg.device or None, distill_model=cfg.distill_model or None)
    overrides.update(extra)
    return get_cfg(overrides=overrides)


def write_args_yaml(path: Path, args: SimpleNamespace) -> None:
    """Ultralytics' args.yaml: the full namespace the run trains with, as its trainer writes it."""

    plain = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path.write_text(yaml.safe_dump(plain, sort_keys=False))


def synthetic_dataset(root: Path, is_main: bool, barrier) -> Path:
    """The built-in synthetic set under root/datasets/synthetic-shapes, generated once (by the main process)."""

    out = root / "datasets" / "synthetic-shapes"
    data_yaml = out / "data.yaml"  # written last, so its presence means the set is complete
    if is_main and not data_yaml.exists():
        write_synthetic_dataset(out)
    barrier()
    return data_yaml


def check_dataset(data_yaml: str | Path) -> dict[str, Any]:
    """Ultralytics' data.yaml check without any download; every failure becomes a UserError naming the file."""

    path = Path(data_yaml)
    if not path.is_file():
        raise UserError(f"data file '{data_yaml}' not found.")
    try:
        data = check_det_dataset(str(path), autodownload=False)
    except Exception as e:  # Ultralytics raises FileNotFoundError/SyntaxError/TypeError with a useful message
        raise UserError(f"data file '{data_yaml}': {_one_line(e)}") from None
    for split in ("train", "val"):
        if not data.get(split):
            raise UserError(f"data file '{data_yaml}': key '{split}' is missing.")
    return data


def _one_line(e: Exception) -> str:
    """Ultralytics' messages span lines and carry emojis; keep the words on one line."""
    return " ".join(str(e).replace("❌", "").split())


class ShardSampler(Sampler[int]):
    """A rank's disjoint shard of a (per-epoch shuffled) permutation, padded like DistributedSampler.

    `set_epoch(epoch, skip)` fixes the permutation for `epoch` and drops the first `skip` samples of this rank's
    shard, so a resumed run continues from the exact data position it stopped at.
    """

    def __init__(self, dataset: Dataset, rank: int, world: int, shuffle: bool, seed: int, groups_of: int = 0):
        self.n, self.rank, self.world, self.shuffle, self.seed = len(dataset), rank, world, shuffle, seed
        self.per_rank = math.ceil(self.n / world)
        # rect: each batch is one of the dataset's groups of `groups_of` consecutive images (one shape); a rank
        # takes every world-th group, the last, shorter group last
        self.groups_of = groups_of
        if groups_of:
            self.per_rank = math.ceil(math.ceil(self.n / groups_of) / world) * groups_of
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[int]:
        if self.groups_of:
            return iter(self._groups()[self.skip :])
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order += order[: self.per_rank * self.world - self.n]  # pad so every rank gets the same count
        shard = order[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]  # contiguous: val order is kept
        return iter(shard[self.skip :])

    def _groups(self) -> list[int]:
        """This rank's whole groups in order; ranks with one group fewer repeat the first (full) groups, so every
        rank takes the same number of batches."""
        size = self.groups_of
        groups = [list(range(g, min(g + size, self.n))) for g in range(0, self.n, size)]
        mine = groups[self.rank :: self.world]
        mine += groups[: self.per_rank // size - len(mine)]
        return [i for group in mine for i in group]

    def __len__(self) -> int:
        return (len(self._groups()) if self.groups_of else self.per_rank) - self.skip


def build_dataset(args: SimpleNamespace, data: dict, split: str, batch: int, stride: int) -> Dataset:

    mode = "train" if split == "train" else "val"
    try:
        dataset = build_yolo_dataset(args, data[split], batch, data, mode=mode, rect=mode == "val", stride=stride)
    except Exception as e:  # e.g. "No images found in ...", "No valid images found ..."
        raise UserError(f"{split} split '{data[split]}': {_one_line(e)}") from None
    if len(dataset) == 0:
        raise UserError(f"{split} split '{data[split]}': no usable images.")
    _explain_skipped(dataset)
    return dataset


# Ultralytics' reasons for a skipped image that name a cause other than the real one
_CRYPTIC = {"pi_heif": "not an image it can decode (an empty or damaged file?)"}


def _explain_skipped(dataset: Dataset) -> None:
    """One clearer line for each skipped image whose reason in Ultralytics' label cache is cryptic."""

    files = getattr(dataset, "label_files", None)
    cache = Path(files[0]).parent.with_suffix(".cache") if files else None
    try:
        messages = load_dataset_cache_file(cache).get("msgs", []) if cache and cache.is_file() else []
    except Exception:
        return
    for message in messages:
        for token, meaning in _CRYPTIC.items():
            if token in message:
                image = re.sub(r"\x1b\[[0-9;]*m", "", message).split(": ignoring", 1)[0].split(" ")[-1]
                warn(f"'{image}' was skipped: {meaning}")


class EpochBatches(Sampler[list[int]]):
    """Batches of a ShardSampler's epochs back to back, from (epoch, skip) on: one loader iterator serves the whole
    run, so its workers prefetch the next epoch's first batches while an epoch ends (Ultralytics' InfiniteDataLoader
    does the same). An epoch's batches never mix with the next one's."""

    def __init__(self, sampler: ShardSampler, batch: int):
        self.sampler, self.batch = sampler, batch
        self.start = (0, 0)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip = self.start
        while True:
            self.sampler.set_epoch(epoch, skip)
            indices = list(self.sampler)
            for i in range(0, len(indices), self.batch):
                yield indices[i : i + self.batch]
            epoch, skip = epoch + 1, 0

    def __len__(self) -> int:
        """Batches of a whole epoch."""
        return math.ceil(self.sampler.per_rank / self.batch)


class TrainLoader:
    """The training batches, epoch by epoch, from one DataLoader iterator kept across epochs. `epoch(e, skip)`
    yields epoch e's batches after its first `skip` (a resume's position); asked for the epoch that follows where
    the iterator stands, it goes on with the batches already prefetched, otherwise it starts a new iterator there."""

    def __init__(self, loader: DataLoader, batches: EpochBatches):
        self.loader, self.batches = loader, batches
        self.dataset = loader.dataset
        self._iterator: Iterator | None = None
        self._at = self._started_at = (-1, -1)  # (epoch, batches of it consumed) where the iterator stands

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def started(self) -> bool:
        """Whether the iterator (and so its worker processes) exists."""
        return self._iterator is not None

    def start(self, epoch: int, skip: int = 0) -> None:
        """Start the iterator at (epoch, skip) now, so its workers prepare the first batches before they are asked
        for (does nothing if it stands there already)."""
        if self._iterator is None or self._at != (epoch, skip):
            self.batches.start = (epoch, skip * self.batches.batch)
            self._iterator = iter(self.loader)
            self._at = self._started_at = (epoch, skip)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        if not self.loader.persistent_workers and self._at != self._started_at:
            self._iterator = None  # persistent_workers=False: new workers for every epoch
        self.start(epoch, skip)
        for i in range(skip, len(self)):
            batch = next(self._iterator)
            self._at = (epoch, i + 1) if i + 1 < len(self) else (epoch + 1, 0)
            yield batch

    def __iter__(self) -> Iterator[dict]:
        """One epoch from where the stream stands (a whole one if it stands at an epoch's start)."""
        epoch, done = self._at if self._at[0] >= 0 else (0, 0)
        return self.epoch(epoch, done)


def loader_workers(cfg: TrainConfig, use_cuda: bool) -> int:
    """Worker processes per device: `workers` up to the CPU count; none when training on the CPU (Ultralytics'
    rule: the step takes the time there, and workers would compete with it for the cores)."""
    return min(cfg.workers, os.cpu_count() or 1) if use_cuda else 0


def build_train_loader(
    dataset: Dataset, cfg: TrainConfig, batch: int, rank: int, world: int, use_cuda: bool, workers: int | None = None
) -> TrainLoader:
    """`batch` images per step over a ShardSampler, with Ultralytics' collate and worker seeding; `workers`: that
    many worker processes instead of loader_workers()'s choice (the loader measured alone)."""

    # rect (Ultralytics): batches of one shape each, in the dataset's order (shuffling would mix the shapes)
    rect = getattr(dataset, "rect", False)
    sampler = ShardSampler(dataset, rank, world, shuffle=not rect, seed=cfg.seed, groups_of=batch if rect else 0)
    batches = EpochBatches(sampler, batch)
    workers = loader_workers(cfg, use_cuda) if workers is None else workers
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=cfg.pin_memory and use_cuda,
        persistent_workers=cfg.persistent_workers and workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        collate_fn=dataset.collate_fn,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(cfg.seed + rank),
    )
    return TrainLoader(loader, batches)


def build_val_loader(
    dataset: Dataset, cfg: TrainConfig, batch: int, rank: int, world: int, use_cuda: bool
) -> DataLoader:
    """Ultralytics' own validation loader (`batch`: the plan's validation batch; 2 x the workers, as its trainer):
    rectangular batches, and under several processes its contiguous, batch-aligned shards that its validator gathers
    back together."""

    device = "cuda" if use_cuda else "cpu"
    return build_dataloader(
        dataset,
        batch,
        2 * loader_workers(cfg, use_cuda),
        shuffle=False,
        rank=rank if world > 1 else -1,
        pin_memory=cfg.pin_memory,
        device=device,
    )


def class_weights(dataset, nc: int, power: float) -> torch.Tensor:
    """Ultralytics' cls_pw: inverse class frequency of the train labels raised to `power`, classes without labels
    at the mean weight, normalised to mean 1 (its DetectionTrainer.set_class_weights)."""
    labels = [lb["cls"].flatten() for lb in dataset.labels]
    counts = np.bincount(np.concatenate(labels, 0).astype(int), minlength=nc).astype(np.float32)
    present = counts > 0
    weights = (1.0 / np.where(present, counts, 1.0)) ** power
    weights = np.where(present, weights, weights[present].mean())
    return torch.from_numpy(weights / weights.mean())


def rescale_batch(img: torch.Tensor, imgsz: int, multi_scale: float, stride: int) -> torch.Tensor:
    """Ultralytics' multi_scale: the batch resized to a random multiple of `stride` within imgsz x (1 +/- multi_scale)
    (Python's random, which the run seeds and checkpoints), as its DetectionTrainer.preprocess_batch does."""
    low = max(stride, int(imgsz * (1.0 - multi_scale)))
    size = random.randrange(low, int(imgsz * (1.0 + multi_scale) + stride)) // stride * stride
    factor = size / max(img.shape[2:])
    if factor == 1:
        return img
    shape = [math.ceil(x * factor / stride) * stride for x in img.shape[2:]]
    return torch.nn.functional.interpolate(img, size=shape, mode="bilinear", align_corners=False)


def largest_imgsz(imgsz: int, multi_scale: float, stride: int) -> int:
    """The largest batch size multi_scale makes: what batch=auto plans memory for (Ultralytics' auto_batch)."""
    return math.ceil(imgsz * (1 + multi_scale) / stride) * stride
