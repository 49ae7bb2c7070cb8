"""The training loop. Read top to bottom: `__init__` builds everything, `train()` runs epochs, `train_epoch()` one
epoch, `train_step()` one micro-batch. Ultralytics supplies the model, loss, data and metrics; Accelerate supplies
devices, DDP and precision; the semantics of a step are Ultralytics' trainer's (optim.py).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from yoloscale import backend
from yoloscale.checkpoint import TrainerState, load_checkpoint, save_checkpoint, save_weights
from yoloscale.checkpoint.full_state import optimizer_names
from yoloscale.config import TrainConfig
from yoloscale.data import (build_dataset, build_train_loader, build_val_loader, check_dataset, synthetic_dataset,
                            ultralytics_args)  # fmt: skip
from yoloscale.ema import ShardedEMA, full_model_state
from yoloscale.errors import UserError
from yoloscale.export import write_ultralytics_pt
from yoloscale.grad_ckpt import apply_grad_ckpt
from yoloscale.model import build_model, load_matching, load_weights, model_spec, read_ultralytics_pt
from yoloscale.optim import Schedule, build_optimizer, choose_optimizer, nominal_accumulate, scaled_weight_decay
from yoloscale.preemption import Preempted, StopSignal, requeue_slurm_job
from yoloscale.run_dir import new_run_dir, update_run_info, write_run_info
from yoloscale.run_log import RunLog, seconds_since_start
from yoloscale.validate import Validator

OOM_RETRIES = 3  # as Ultralytics' trainer
AUTOTUNE_TIMED = (10, 40)  # cudnn_benchmark=auto times these micro-steps of a process (after the start-up's)
AUTOTUNE_WORTH_S = 600.0  # ... and autotunes when more training than this is left


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


class OutOfMemory(Exception):
    """A CUDA out-of-memory error inside a training step (caught by the epoch loop)."""


class Trainer:
    def __init__(self, cfg: TrainConfig):
        from accelerate.utils import broadcast_object_list, set_seed

        self.cfg = cfg
        # --- devices, precision, the batch per device -----------------------------------------------------------
        backend.distributed_env_from_slurm()
        world = int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's; Accelerate reads the same variable
        self.device_batch = device_batch_of(cfg, world)
        self.backend = backend.get(cfg)
        self.accelerator = acc = self.backend.build_accelerator(self.device_batch)
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
        spec = model_spec(cfg.model, cfg.trust_pickle)
        model = build_model(spec, self.data["nc"], self.data["names"], self.args, verbose=self.is_main)
        weights_report = ""
        if not cfg.resume and cfg.model.endswith(".pt"):
            weights_report = load_matching(model, read_ultralytics_pt(cfg.model, cfg.trust_pickle)[1], cfg.model)
        elif cfg.weights and not cfg.resume:
            weights_report = load_weights(model, cfg.weights, cfg.trust_pickle)
        stride = max(int(model.stride.max()), 32)
        # A plain, unsharded copy for validation and export: the (EMA) weights are copied into it when needed.
        self.eval_model = copy.deepcopy(model).eval().requires_grad_(False).to(acc.device)
        ckpt_layers = apply_grad_ckpt(model, cfg.grad_ckpt, cfg.grad_ckpt_recompute)

        # --- data loaders (the main process first: it writes Ultralytics' label caches) ---------------------------
        with acc.main_process_first():
            self.train_set = build_dataset(self.args, self.data, "train", self.device_batch, stride)
            val_set = build_dataset(self.args, self.data, "val", cfg.val_batch or 2 * self.device_batch, stride)
        self.use_cuda = self.device.type == "cuda"
        self.train_loader = self._train_loader()
        val_loader = build_val_loader(val_set, cfg, self.device_batch, acc.process_index, self.world, self.use_cuda)
        self.validator = Validator(self.args, self.data, val_loader, self.run_dir, self.world)

        # --- optimizer and schedule, Ultralytics' rules (optim.py) -----------------------------------------------
        self.batch = self.device_batch * self.world  # the global batch
        self.choice = choose_optimizer(cfg, len(self.train_set), self.data["nc"])
        # what exported checkpoints record as their training arguments, as Ultralytics' trainer records them
        self.args.optimizer, self.args.lr0, self.args.warmup_bias_lr = self.choice.name, self.choice.lr0, self.choice.warmup_bias_lr
        nominal = nominal_accumulate(cfg, self.batch, len(self.train_loader))
        self.weight_decay = scaled_weight_decay(cfg, self.batch, cfg.accumulate or max(round(cfg.nbs / self.batch), 1))
        model = self.backend.wrap(acc, model)  # SyncBN; FSDP2 shards here, before the optimizer sees the model
        optimizer = build_optimizer(model, self.choice, self.weight_decay, fused=self.backend.fused_optimizer(),
                                    sharded=self.backend.sharded)  # fmt: skip
        self.group_names = optimizer_names(model, optimizer)  # resuming another backend's checkpoint needs them
        self.model, self.optimizer = self.backend.prepare(acc, model, optimizer)
        self.raw_model = backend.unwrap(self.model)
        # Ultralytics' criterion takes its device (and Detect's strides) from the model's parameters: built from the
        # plain copy on the compute device, as with offload=params the trained model's parameters are in CPU memory.
        self.criterion = self.eval_model.init_criterion()
        self.ema = ShardedEMA(self.raw_model, decay=cfg.ema_decay, tau=cfg.ema_tau) if cfg.ema else None
        self.schedule = Schedule.create(cfg, self.choice, len(self.train_loader), nominal)
        self.channels_last = cfg.channels_last and self.use_cuda
        # validate.py turns autotuning off for validation; 'auto' decides after timing the first micro-steps
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark == "on" and self.use_cuda
        self._autotune_clock: list[float] = []

        # --- counters, on-device accumulators (read only at the logging interval) ------------------------------
        self.state = TrainerState(world_size=self.world, batch=self.device_batch, backend=cfg.backend)
        self.bad_run = torch.zeros((), device=self.device)  # current streak of non-finite steps
        self.bad_max = torch.zeros((), device=self.device)  # longest streak since the last check
        self.bad_total = torch.zeros((), device=self.device)
        self.interval_losses, self.epoch_losses = LossMeter(), LossMeter()
        self.log = RunLog(cfg, self.run_dir, enabled=self.is_main)
        self.stop_signal = StopSignal()
        self.first_step_s: float | None = None
        if cfg.resume:
            self._resume(Path(cfg.resume))
        elif self.is_main:
            cfg.save(self.run_dir / "config.yaml")
            write_run_info(self.run_dir, {"model": str(Path(spec).resolve()) if isinstance(spec, str) and
                                          Path(spec).is_file() else spec, "data": str(data_yaml),
                                          "names": self.data["names"], "imgsz": cfg.imgsz})  # fmt: skip
        if weights_report:
            self.log.message(weights_report)
        self.log.message(self._describe(len(ckpt_layers), len(model.model)))

    def _describe(self, ckpt_layers: int, layers: int) -> str:
        cfg, c = self.cfg, self.choice
        return (
            f"yoloscale: {self.world} process(es) on {self.device.type}, backend={cfg.backend}, precision="
            f"{self.backend.precision_name}, gradient checkpointing on {ckpt_layers} of {layers} layers"
            f"{f' (recompute={cfg.grad_ckpt_recompute})' if ckpt_layers else ''}; batch {self.batch} = "
            f"{self.device_batch}/device x {self.world}, accumulate {self.schedule.accumulate}"
            f"{' (from 1 during warmup)' if self.schedule.warmup_batches and self.schedule.accumulate > 1 else ''}; "
            f"{c.reason or f'optimizer {c.name}'}: lr0 {c.lr0:g}, weight_decay {self.weight_decay:.4g}; "
            f"run directory {self.run_dir}"
        )

    # ------------------------------------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Run the remaining epochs; returns the last validation metrics."""
        metrics: dict[str, float] = {}
        self.stop_signal.install()  # SIGUSR1/SIGTERM: checkpoint at the next logging interval, then stop
        first_epoch = self.state.epoch
        try:
            while self.state.epoch < self.cfg.epochs and not self.state.early_stopped:
                start = time.perf_counter()
                try:
                    images = self.train_epoch()
                except OutOfMemory as e:
                    self._retry_smaller(first_epoch, e)
                    continue
                metrics = self.end_epoch(images / max(time.perf_counter() - start, 1e-9), metrics)
        finally:
            self.stop_signal.uninstall()
        self._finish(metrics)
        return metrics

    def end_epoch(self, img_s: float, metrics: dict[str, float]) -> dict[str, float]:
        """E2E loss update, validation, best weights, early stopping, the metrics row and the epoch-end checkpoint."""
        cfg, st = self.cfg, self.state
        if hasattr(self.criterion, "update"):  # YOLO26's E2ELoss: once per epoch
            self.criterion.update()
        self._check_bad_steps()
        self._refresh_eval_model()  # collective under sharding
        if cfg.val or st.epoch + 1 == cfg.epochs:
            half = self.use_cuda and self.backend.precision_name != "fp32"  # Ultralytics: AMP runs val in fp16
            metrics = self.validator(self.eval_model, self.device, self.epoch_losses.names, half=half)
        epoch = st.epoch
        st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        self._save_best(metrics)
        if cfg.patience and st.epoch - st.best_epoch >= cfg.patience and "fitness" in metrics:
            st.early_stopped = True
            self.log.message(f"early stopping: no better fitness for {cfg.patience} epochs (best at epoch "
                             f"{st.best_epoch}); patience=0 disables it")  # fmt: skip
        self.log.epoch_end(self._epoch_row(metrics, img_s), step=st.optimizer_steps)
        keep = cfg.save_period > 0 and epoch % cfg.save_period == 0  # Ultralytics' epoch{N}.pt, N 0-based
        save_checkpoint(self.accelerator, self.run_dir, st, self._ema_state(), keep_this=keep)
        if keep and self.is_main:
            (self.run_dir / "weights").mkdir(exist_ok=True)
            write_ultralytics_pt(self.eval_model, self.args, self.run_dir / "weights" / f"epoch{epoch}.pt", metrics)
        return metrics

    def train_epoch(self) -> int:
        """One epoch (or what is left of it after a resume); returns the number of images processed."""
        cfg, st = self.cfg, self.state
        if cfg.close_mosaic and st.epoch >= cfg.epochs - cfg.close_mosaic and self.args.mosaic > 0:
            self.log.message(f"closing mosaic for the last {cfg.close_mosaic} epochs")
            self.train_loader.dataset.close_mosaic(self.args)  # Ultralytics' own switch (zeroes mosaic/mixup/...)
            self.train_loader = self._train_loader()
        self.train_loader.sampler.set_epoch(st.epoch, skip=st.batch_in_epoch * self.device_batch)
        self.model.train()
        images, t_log, n_log = 0, time.perf_counter(), 0
        bar = self.log.epoch_bar(self.train_loader, len(self.train_loader), st.epoch, cfg.epochs)
        for batch in bar:
            stepped = self.train_step(batch)
            st.batch_in_epoch += 1
            if len(self._autotune_clock) <= AUTOTUNE_TIMED[1]:
                self._maybe_autotune()
            n = batch["img"].shape[0] * self.world
            images, n_log = images + n, n_log + n
            if stepped and self.first_step_s is None:
                self._first_step_done()
            if stepped and st.optimizer_steps % cfg.log_interval == 0:
                values = {"step": st.optimizer_steps, **self.interval_losses.read()}  # the interval's one host sync
                values["lr"] = self.optimizer.param_groups[0]["lr"]
                self._check_bad_steps()
                now = time.perf_counter()
                values["img_s"] = n_log / (now - t_log)
                if self.use_cuda:
                    values["mem_GiB"] = torch.cuda.max_memory_reserved(self.device) / 2**30
                t_log, n_log = now, 0
                self.log.step(values, st.optimizer_steps)
                self._stop_if_signalled()
            if stepped and cfg.save_steps and st.optimizer_steps % cfg.save_steps == 0:
                self._check_bad_steps()
                save_checkpoint(self.accelerator, self.run_dir, st, self._ema_state())
        return images

    def train_step(self, batch: dict) -> bool:
        """Forward, loss and backward of one micro-batch; at the end of an accumulation window also clip, step
        (skipped on the device if the gradient norm is not finite) and update the EMA. Returns whether the optimizer
        stepped. No host synchronisation of ours (Ultralytics' loss has one: docs/benchmarks.md)."""
        acc, cfg, st = self.accelerator, self.cfg, self.state
        ni = st.micro_step  # Ultralytics' batch index: the schedule's position
        self.schedule.apply(self.optimizer, ni, st.epoch)
        sync = ni - st.last_opt_step >= self.schedule.accumulate_at(ni)
        oom = None
        try:
            batch = self.prepare_batch(batch)
            with self.backend.micro_step(self.model, sync, acc):
                preds = self.model(batch["img"])  # autocast inside forward (Accelerate's, or DeepSpeed's)
                loss, loss_items = self.criterion(preds, batch)
                # Ultralytics: its loss is summed over the micro-batch, and x devices since DDP averages: the
                # gradient of the loss summed over every image since the last step (DeepSpeed steps in here).
                self.backend.backward(loss.sum() * self.world, self.model, sync, acc)
        except torch.OutOfMemoryError as e:
            oom = str(e)  # raised below, outside this block, so the failed forward's tensors are freed first
        if oom is not None:
            raise OutOfMemory(oom)
        st.micro_step += 1
        self.interval_losses.add(loss_items)
        self.epoch_losses.add(loss_items)
        if not sync:
            return False
        bad = self.backend.step(self.model, self.optimizer, cfg.grad_clip, acc)
        if self.ema is not None:
            self.ema.update(self.raw_model)
        self.bad_run = (self.bad_run + 1) * bad
        self.bad_max = torch.maximum(self.bad_max, self.bad_run)
        self.bad_total += bad
        st.optimizer_steps += 1
        st.last_opt_step = ni
        return True

    # --- helpers of the loop ---------------------------------------------------------------------------------------
    def prepare_batch(self, batch: dict) -> dict:
        """Move a collated batch to the device (non-blocking from pinned memory); images to float in [0, 1]."""
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                batch[k] = v.to(self.device, non_blocking=self.use_cuda)
        img = batch["img"].float() / 255
        batch["img"] = img.contiguous(memory_format=torch.channels_last) if self.channels_last else img
        return batch

    def _train_loader(self):
        return build_train_loader(self.train_set, self.cfg, self.device_batch, self.accelerator.process_index,
                                  self.world, self.use_cuda)  # fmt: skip

    def _maybe_autotune(self) -> None:
        """cudnn_benchmark=auto: time micro-steps AUTOTUNE_TIMED of this process; if the rest of the run at that
        pace is longer than AUTOTUNE_WORTH_S, switch cuDNN's autotuning on (it pays back ~30 s within ~6 min)."""
        self._autotune_clock.append(time.perf_counter())
        first, last = AUTOTUNE_TIMED
        if len(self._autotune_clock) != last + 1 or self.cfg.cudnn_benchmark != "auto" or not self.use_cuda:
            return
        per_step = (self._autotune_clock[last] - self._autotune_clock[first]) / (last - first)
        left = per_step * (self.cfg.epochs * len(self.train_loader) - self.state.micro_step)
        if left > AUTOTUNE_WORTH_S:
            torch.backends.cudnn.benchmark = True
            self.log.message(f"cudnn_benchmark=auto: {left / 60:.0f} min of training left, cuDNN autotuning on")

    def _first_step_done(self) -> None:
        self.first_step_s = seconds_since_start()
        if self.is_main:
            update_run_info(self.run_dir, first_step_s=round(self.first_step_s, 2))
        self.log.message(f"first optimizer step {self.first_step_s:.1f} s after the command started")

    def _retry_smaller(self, first_epoch: int, error: OutOfMemory) -> None:
        """A CUDA out-of-memory error in the first epoch of a single-process run: restart the epoch with half the
        per-device batch and twice the accumulation (the global batch, lr and weight decay stay; BatchNorm sees
        half the images per forward). Otherwise, or after OOM_RETRIES, a one-line error with what would fit."""
        st, cfg = self.state, self.cfg
        peak = torch.cuda.max_memory_reserved(self.device) / 2**30 if self.use_cuda else 0.0
        total = torch.cuda.get_device_properties(self.device).total_memory / 2**30 if self.use_cuda else 0.0
        self._free_memory()
        retries = getattr(self, "_oom_retries", 0)
        if self.world > 1 or st.epoch != first_epoch or retries >= OOM_RETRIES or self.device_batch == 1:
            hint = "" if cfg.grad_ckpt != "off" else ", or grad_ckpt=highres (about 60% less activation memory)"
            raise UserError(
                f"out of memory at device_batch {self.device_batch} (batch {self.batch} over {self.world} "
                f"device(s)), imgsz {cfg.imgsz}: {peak:.1f} of {total:.1f} GiB reached on {self.device}. Try "
                f"device_batch={max(self.device_batch // 2, 1)} with accumulate={2 * self.schedule.accumulate} "
                f"(same global batch){hint}. ({_first_line(str(error))})")  # fmt: skip
        self._oom_retries = retries + 1
        old = self.device_batch
        self.device_batch = max(old // 2, 1)
        self.train_loader = self._train_loader()
        accumulate = self.schedule.accumulate * old // self.device_batch
        self.schedule = Schedule.create(cfg, self.choice, len(self.train_loader), accumulate)
        st.batch, st.batch_in_epoch, st.micro_step, st.last_opt_step = self.device_batch, 0, 0, -1
        self.optimizer.zero_grad(set_to_none=True)
        self.interval_losses, self.epoch_losses = LossMeter(), LossMeter()
        self.log.message(
            f"CUDA out of memory at device_batch {old} ({peak:.1f} of {total:.1f} GiB): retrying the epoch with "
            f"device_batch {self.device_batch} and accumulate {self.schedule.accumulate} ({self._oom_retries}/"
            f"{OOM_RETRIES}); the global batch per optimizer step and the lr stay, BatchNorm now sees "
            f"{self.device_batch} images per forward instead of {old}")  # fmt: skip

    def _free_memory(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.use_cuda:
            torch.cuda.empty_cache()

    def _stop_if_signalled(self) -> None:
        """At a logging interval: if any rank got SIGUSR1/SIGTERM, all save a checkpoint here and stop together."""
        got = torch.tensor(float(self.stop_signal.received is not None), device=self.device)
        if self.accelerator.reduce(got, reduction="max").item() == 0:
            return
        ckpt = save_checkpoint(self.accelerator, self.run_dir, self.state, self._ema_state())
        requeued = requeue_slurm_job() if self.is_main else None
        raise Preempted(f"stop signal received: checkpoint {ckpt} written"
                        + (f"; {requeued}" if requeued else "") + f". Continue with resume={self.run_dir}")

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
        row = {"epoch": self.state.epoch, "time": round(seconds_since_start(), 2),
               "optimizer_steps": self.state.optimizer_steps}  # fmt: skip
        row.update({f"train/{k}": v for k, v in self.epoch_losses.read().items()})
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        row.update({f"val/{k}": v for k, v in metrics.items()})
        row.update(img_s=img_s, skipped_steps=self.state.skipped_steps)
        return row

    def _save_best(self, metrics: dict[str, float]) -> None:
        fitness = metrics.get("fitness")
        if fitness is None or fitness <= self.state.best_fitness:
            return
        self.state.best_fitness, self.state.best_epoch = fitness, self.state.epoch
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
            if state.batch_in_epoch and (state.world_size, state.batch) != (self.world, self.device_batch):
                raise UserError(
                    f"checkpoint '{ckpt}' was saved mid-epoch with {state.world_size} process(es) x device_batch "
                    f"{state.batch}; resume it with the same, or from an epoch-end checkpoint (now {self.world} x "
                    f"{self.device_batch})."
                )

        state, ema_state = load_checkpoint(self.accelerator, ckpt, self.model, self.optimizer, self.backend,
                                           self.group_names, check)  # fmt: skip
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
        state.world_size, state.batch, state.backend = self.world, self.device_batch, self.cfg.backend
        self.state = state
        self.log.message(f"resumed from {ckpt}: epoch {state.epoch + 1}, optimizer step {state.optimizer_steps}")


def device_batch_of(cfg: TrainConfig, world: int) -> int:
    """Images per device per micro-step: `device_batch`, or the global `batch` split evenly over the devices."""
    if cfg.device_batch:
        return cfg.device_batch
    if cfg.batch % world:
        raise UserError(f"batch={cfg.batch} does not split evenly over {world} devices; give a multiple of {world} "
                        f"(e.g. batch={max(cfg.batch // world, 1) * world}) or device_batch=.")  # fmt: skip
    return cfg.batch // world


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:200] if text.strip() else ""
