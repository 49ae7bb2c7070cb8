"""The training loop. Read top to bottom: `__init__` builds everything, `train()` runs epochs, `train_step()` is one
micro-batch. Ultralytics supplies the model, loss, data and metrics; Accelerate supplies devices, DDP and precision.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from yoloscale import backend
from yoloscale.checkpoint import TrainerState, load_checkpoint, save_checkpoint, save_weights
from yoloscale.config import TrainConfig
from yoloscale.data import (build_dataset, build_train_loader, build_val_loader, check_dataset, synthetic_dataset,
                            ultralytics_args)  # fmt: skip
from yoloscale.ema import ShardedEMA, full_model_state
from yoloscale.errors import UserError
from yoloscale.export import write_ultralytics_pt
from yoloscale.grad_ckpt import apply_grad_ckpt
from yoloscale.model import build_model, load_weights
from yoloscale.optim import Schedule, auto_accumulate, build_optimizer, lr_scale
from yoloscale.preemption import Preempted, StopSignal, requeue_slurm_job
from yoloscale.run_dir import new_run_dir, write_run_info
from yoloscale.run_log import RunLog
from yoloscale.validate import Validator


class LossMeter:
    """Running mean of Ultralytics' loss items, kept on the device until read."""

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, loss_items: dict[str, torch.Tensor]) -> None:
        self.names = self.names or tuple(loss_items)
        items = torch.stack([loss_items[k].detach().float() for k in self.names])
        self.total = items if self.total is None else self.total + items
        self.count += 1

    def read(self) -> dict[str, float]:
        """Means since the last read (rank-local: Ultralytics shows rank 0's losses too); a host sync."""
        if self.total is None:
            return {}
        means = (self.total / self.count).tolist()
        self.total, self.count = None, 0
        return dict(zip(self.names, means))


class TrainingDiverged(UserError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient norm."""


class Trainer:
    def __init__(self, cfg: TrainConfig):
        from accelerate.utils import broadcast_object_list, set_seed

        self.cfg = cfg
        # --- devices, precision, accumulation ---------------------------------------------------------------
        backend.distributed_env_from_slurm()
        world = int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's; Accelerate reads the same variable
        self.accumulate = auto_accumulate(cfg, world)
        self.accelerator = acc = backend.build_accelerator(cfg, self.accumulate)
        self.world, self.is_main = acc.num_processes, acc.is_main_process
        self.device = acc.device
        set_seed(cfg.seed)

        # --- run directory (decided on rank 0, shared with the others) ---------------------------------------
        run = [Path(cfg.project) / cfg.name if cfg.resume else None]
        if self.is_main and not cfg.resume:
            run[0] = new_run_dir(cfg)
            run[0].mkdir(parents=True, exist_ok=True)
        self.run_dir: Path = broadcast_object_list(run)[0] if self.world > 1 else run[0]

        # --- data description and Ultralytics' argument namespace --------------------------------------------
        if cfg.data == "synthetic":
            data_yaml = synthetic_dataset(Path(cfg.project), self.is_main, acc.wait_for_everyone)
        else:
            data_yaml = Path(cfg.data).resolve()
        self.data = check_dataset(data_yaml)
        self.args = ultralytics_args(cfg, data_yaml)

        # --- model, loss, EMA --------------------------------------------------------------------------------
        model = build_model(cfg.model, self.data["nc"], self.data["names"], self.args, verbose=self.is_main)
        if cfg.weights and not cfg.resume:
            load_weights(model, cfg.weights)
        stride = max(int(model.stride.max()), 32)
        # A plain, unsharded copy for validation and export: the (EMA) weights are copied into it when needed.
        self.eval_model = copy.deepcopy(model).eval().requires_grad_(False).to(acc.device)
        ckpt_layers = apply_grad_ckpt(model, cfg.grad_ckpt, cfg.grad_ckpt_recompute)

        # --- data loaders (the main process first: it writes Ultralytics' label caches) ---------------------------
        with acc.main_process_first():
            train_set = build_dataset(self.args, self.data, "train", cfg.batch, stride)
            val_set = build_dataset(self.args, self.data, "val", cfg.val_batch or 2 * cfg.batch, stride)
        use_cuda = self.device.type == "cuda"
        self.train_loader = build_train_loader(train_set, cfg, acc.process_index, self.world, use_cuda)
        self.validator = Validator(self.args, self.data, build_val_loader(val_set, cfg, acc.process_index,
                                                                          self.world, use_cuda), self.run_dir, self.world)  # fmt: skip

        # --- optimizer, LR rule, schedule -------------------------------------------------------------------
        self.global_batch = cfg.batch * self.world * self.accumulate
        scale = lr_scale(cfg, self.global_batch)
        model = backend.wrap_model(acc, cfg, model)  # SyncBN; FSDP2 shards here, before the optimizer sees the model
        optimizer = build_optimizer(cfg, model, lr=cfg.lr0 * scale, fused=backend.fused_optimizer(cfg))
        self.model, self.optimizer = backend.prepare(acc, model, optimizer)
        self.raw_model = acc.unwrap_model(self.model)
        # Ultralytics' criterion takes its device (and Detect's strides) from the model's parameters: built from the
        # plain copy on the compute device, as with offload=params the trained model's parameters are in CPU memory.
        self.criterion = self.eval_model.init_criterion()
        self.ema = ShardedEMA(self.raw_model, decay=cfg.ema_decay, tau=cfg.ema_tau) if cfg.ema else None
        self.schedule = Schedule.create(cfg, batches_per_epoch=len(self.train_loader), scale=scale)
        # Each micro-step back-propagates loss_sum x nbs / (batch x accumulate); Accelerate divides by accumulate.
        self.loss_factor = cfg.nbs / cfg.batch
        self.channels_last = cfg.channels_last and use_cuda

        # --- counters, on-device accumulators (read only at the logging interval) ------------------------------
        self.state = TrainerState(world_size=self.world, batch=cfg.batch, accumulate=self.accumulate,
                                  backend=cfg.backend)  # fmt: skip
        self.bad_run = torch.zeros((), device=self.device)  # current streak of non-finite steps
        self.bad_max = torch.zeros((), device=self.device)  # longest streak since the last check
        self.bad_total = torch.zeros((), device=self.device)
        self.interval_losses, self.epoch_losses = LossMeter(), LossMeter()
        self.log = RunLog(cfg, self.run_dir, enabled=self.is_main)
        self.stop_signal = StopSignal()
        if cfg.resume:
            self._resume(Path(cfg.resume))
        elif self.is_main:
            cfg.save(self.run_dir / "config.yaml")
            model_yaml = Path(cfg.model).resolve() if Path(cfg.model).is_file() else cfg.model
            write_run_info(self.run_dir, {"model": str(model_yaml), "data": str(data_yaml),
                                          "names": self.data["names"], "imgsz": cfg.imgsz})  # fmt: skip
        self.log.message(
            f"yoloscale: {self.world} process(es) on {self.device.type}, backend={cfg.backend}, precision="
            f"{acc.yoloscale_precision}, gradient checkpointing on {len(ckpt_layers)} of {len(model.model)} layers"
            f"{f' (recompute={cfg.grad_ckpt_recompute})' if ckpt_layers else ''}, "
            f"batch {cfg.batch}/device x {self.world} device(s) x accumulate {self.accumulate} = global batch "
            f"{self.global_batch}; lr_scaling={cfg.lr_scaling}: lr = lr0 {cfg.lr0} x {scale:.3g} = {cfg.lr0 * scale:.4g}; "
            f"run directory {self.run_dir}"
        )

    # ------------------------------------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Run the remaining epochs; returns the last validation metrics."""
        metrics: dict[str, float] = {}
        self.stop_signal.install()  # SIGUSR1/SIGTERM: checkpoint at the next logging interval, then stop
        try:
            while self.state.epoch < self.cfg.epochs:
                start, images = time.perf_counter(), self.train_epoch()
                metrics = self.end_epoch(images / max(time.perf_counter() - start, 1e-9), metrics)
        finally:
            self.stop_signal.uninstall()
        self._finish(metrics)
        return metrics

    def end_epoch(self, img_s: float, metrics: dict[str, float]) -> dict[str, float]:
        """E2E loss update, validation, best weights, the metrics row and the epoch-end checkpoint."""
        cfg, st = self.cfg, self.state
        if hasattr(self.criterion, "update"):  # YOLO26's E2ELoss: once per epoch
            self.criterion.update()
        self._check_bad_steps()
        self._refresh_eval_model()  # collective under sharding
        if cfg.val or st.epoch + 1 == cfg.epochs:
            metrics = self.validator(self.eval_model, self.device, self.epoch_losses.names)
        st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        self._save_best(metrics)
        self.log.epoch_end(self._epoch_row(metrics, img_s), step=st.optimizer_steps)
        save_checkpoint(self.accelerator, self.run_dir, st, self._ema_state())
        return metrics

    def train_epoch(self) -> int:
        """One epoch (or what is left of it after a resume); returns the number of images processed."""
        cfg, st = self.cfg, self.state
        if cfg.close_mosaic and st.epoch >= cfg.epochs - cfg.close_mosaic and self.args.mosaic > 0:
            self.log.message(f"closing mosaic for the last {cfg.close_mosaic} epochs")
            self.train_loader.dataset.close_mosaic(self.args)  # Ultralytics' own switch (zeroes mosaic/mixup/...)
            self.train_loader = build_train_loader(self.train_loader.dataset, cfg, self.accelerator.process_index,
                                                   self.world, self.device.type == "cuda")  # fmt: skip
        self.train_loader.sampler.set_epoch(st.epoch, skip=st.batch_in_epoch * cfg.batch)
        self.model.train()
        images, t_log, n_log = 0, time.perf_counter(), 0
        bar = self.log.epoch_bar(self.train_loader, len(self.train_loader), st.epoch, cfg.epochs)
        for batch in bar:
            stepped = self.train_step(batch)
            st.batch_in_epoch += 1
            st.micro_step += 1
            if stepped and self._schedule_position() <= self.schedule.warmup_batches:
                # Warmup moves with every step, so a skipped one must be known before the next: one host sync per
                # optimizer step, during warmup only (0-2% of a yolo11x step on an H100: tests/gpu_sync_probe.py).
                self._check_bad_steps()
            n = batch["img"].shape[0] * self.world
            images, n_log = images + n, n_log + n
            if stepped and st.optimizer_steps % cfg.log_interval == 0:
                values = {"step": st.optimizer_steps, **self.interval_losses.read()}  # the interval's one host sync
                values["lr"] = self.optimizer.param_groups[0]["lr"]
                self._check_bad_steps()
                now = time.perf_counter()
                values["img_s"] = n_log / (now - t_log)
                if self.device.type == "cuda":
                    values["mem_GiB"] = torch.cuda.max_memory_reserved(self.device) / 2**30
                t_log, n_log = now, 0
                self.log.step(values, st.optimizer_steps)
                self._stop_if_signalled()
            if stepped and cfg.save_period and st.optimizer_steps % cfg.save_period == 0:
                self._check_bad_steps()  # the checkpoint holds the exact skip count (the schedule's position)
                save_checkpoint(self.accelerator, self.run_dir, st, self._ema_state())
        return images

    def train_step(self, batch: dict) -> bool:
        """Forward, loss and backward of one micro-batch; on the last micro-step of an accumulation window also
        clip, step (skipped on the device if the gradient norm is not finite) and update the EMA. Returns whether
        the optimizer stepped. No host synchronisation of ours (Ultralytics' loss has one: docs/benchmarks.md)."""
        acc, cfg, st = self.accelerator, self.cfg, self.state
        batch = self.prepare_batch(batch)
        with acc.accumulate(self.model):  # no gradient all-reduce on non-final micro-steps
            if acc.sync_gradients:  # before backward: DeepSpeed steps inside it
                self.schedule.apply(self.optimizer, self._schedule_position(), st.epoch)
            preds = self.model(batch["img"])  # autocast inside forward (Accelerate's, or DeepSpeed's)
            loss, loss_items = self.criterion(preds, batch)
            acc.backward(loss.sum() * self.loss_factor)
            self.interval_losses.add(loss_items)
            self.epoch_losses.add(loss_items)
            if not acc.sync_gradients:
                return False
            bad = backend.optimizer_step(acc, self.model, self.optimizer, cfg.grad_clip)
        if self.ema is not None:
            self.ema.update(self.raw_model)
        self.bad_run = (self.bad_run + 1) * bad
        self.bad_max = torch.maximum(self.bad_max, self.bad_run)
        self.bad_total += bad
        st.optimizer_steps += 1
        return True

    # --- helpers of the loop ---------------------------------------------------------------------------------------
    def prepare_batch(self, batch: dict) -> dict:
        """Move a collated batch to the device (non-blocking from pinned memory); images to float in [0, 1]."""
        non_blocking = self.device.type == "cuda"
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                batch[k] = v.to(self.device, non_blocking=non_blocking)
        img = batch["img"].float() / 255
        batch["img"] = img.contiguous(memory_format=torch.channels_last) if self.channels_last else img
        return batch

    def _stop_if_signalled(self) -> None:
        """At a logging interval: if any rank got SIGUSR1/SIGTERM, all save a checkpoint here and stop together."""
        got = torch.tensor(float(self.stop_signal.received is not None), device=self.device)
        if self.accelerator.reduce(got, reduction="max").item() == 0:
            return
        ckpt = save_checkpoint(self.accelerator, self.run_dir, self.state, self._ema_state())
        requeued = requeue_slurm_job() if self.is_main else None
        raise Preempted(f"stop signal received: checkpoint {ckpt} written"
                        + (f"; {requeued}" if requeued else "") + f". Continue with resume={self.run_dir}")

    def _schedule_position(self) -> int:
        """Batches into the LR/momentum schedule (Ultralytics' `ni`), less the `accumulate` batches of each skipped
        optimizer step (an fp16 overflow, a non-finite gradient): a skipped step does not advance the schedule."""
        return self.state.micro_step - self.accumulate * self.state.skipped_steps

    def _check_bad_steps(self) -> None:
        """Every rank sees the same all-reduced gradient norm, so every rank raises here together."""
        worst, total = (int(v) for v in torch.stack([self.bad_max, self.bad_total]).tolist())  # one host sync
        self.bad_max.zero_()
        self.state.skipped_steps = total
        if worst >= self.cfg.max_bad_steps:
            raise TrainingDiverged(
                f"training stopped: {worst} consecutive optimizer steps had a non-finite loss or gradient norm "
                f"(max_bad_steps={self.cfg.max_bad_steps}; {total} skipped in all). Lower lr0, check the data, "
                f"or try precision=fp32. The last complete checkpoint is in {self.run_dir / 'checkpoints'}."
            )

    def _refresh_eval_model(self) -> None:
        """Collective: the EMA (or the model's own weights without EMA) into the plain eval model."""
        if self.ema is not None:
            self.ema.load_into(self.eval_model)
        else:
            self.eval_model.load_state_dict(full_model_state(self.raw_model), strict=False)

    def _ema_state(self) -> dict | None:
        """Collective: the whole EMA (rank 0 writes it)."""
        self.state.ema_updates = self.ema.updates if self.ema is not None else 0
        return self.ema.full_state_dict() if self.ema is not None else None

    def _epoch_row(self, metrics: dict[str, float], img_s: float) -> dict:
        row = {"epoch": self.state.epoch, "optimizer_steps": self.state.optimizer_steps}
        row.update({f"train/{k}": v for k, v in self.epoch_losses.read().items()})
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        row.update({f"val/{k}": v for k, v in metrics.items()})
        row.update(img_s=img_s, skipped_steps=self.state.skipped_steps)
        return row

    def _save_best(self, metrics: dict[str, float]) -> None:
        fitness = metrics.get("fitness")
        if fitness is None or fitness <= self.state.best_fitness:
            return
        self.state.best_fitness = fitness
        if self.is_main:
            (self.run_dir / "weights").mkdir(exist_ok=True)
            save_weights(self.eval_model.state_dict(), self.run_dir / "weights" / "best.safetensors")

    def _finish(self, metrics: dict[str, float]) -> None:
        """Final EMA weights as safetensors, best/last as Ultralytics .pt, and the plots."""
        self._refresh_eval_model()
        if self.is_main:
            weights = self.run_dir / "weights"
            weights.mkdir(exist_ok=True)
            model = self.eval_model
            save_weights(model.state_dict(), weights / "last.safetensors")
            write_ultralytics_pt(model, self.args, weights / "last.pt", metrics)
            best = weights / "best.safetensors"
            if best.is_file():
                # Into the eval model, not a model built now: under ZeRO-3 DeepSpeed instruments modules created
                # after its engine, and such a model cannot be pickled ("Can't pickle local object
                # 'instrument_w_nvtx.<locals>.wrapped_fn'", seen on an H100).
                model.load_state_dict(load_file(str(best)))
                write_ultralytics_pt(model, self.args, weights / "best.pt")
            self.log.message(f"done: weights in {weights}")
        self.log.finish(self.cfg.plots)
        self.accelerator.wait_for_everyone()

    def _resume(self, ckpt: Path) -> None:
        def check(state: TrainerState) -> None:
            if state.batch_in_epoch and (state.world_size, state.batch) != (self.world, self.cfg.batch):
                raise UserError(
                    f"checkpoint '{ckpt}' was saved mid-epoch with {state.world_size} process(es) x batch "
                    f"{state.batch}; resume it with the same, or from an epoch-end checkpoint (now {self.world} x "
                    f"{self.cfg.batch})."
                )

        state, ema_state = load_checkpoint(self.accelerator, ckpt, self.model, self.optimizer, self.cfg.backend, check)
        if state.backend != self.cfg.backend:
            self.log.message(f"resuming a backend={state.backend} checkpoint with backend={self.cfg.backend}")
        if self.ema is not None and ema_state is not None:
            self.ema.load_full_state_dict(ema_state, state.ema_updates)
        if hasattr(self.criterion, "update"):
            for _ in range(state.epoch):  # replay E2ELoss's per-epoch schedule
                self.criterion.update()
        self.bad_total.fill_(state.skipped_steps)
        if self.is_main:  # the continuing run's settings (overrides such as epochs= included) for the next resume
            dataclasses.replace(self.cfg, resume="").save(self.run_dir / "config.yaml")
        state.world_size, state.batch, state.accumulate = self.world, self.cfg.batch, self.accumulate
        state.backend = self.cfg.backend
        self.state = state
        self.log.message(f"resumed from {ckpt}: epoch {state.epoch + 1}, optimizer step {state.optimizer_steps}")
