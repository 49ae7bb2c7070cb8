"""The training loop. Read top to bottom: `__init__` builds everything (build.py, one function per part), `train()`
runs epochs, `train_epoch()` one epoch, `train_step()` one micro-batch. Ultralytics supplies the model, loss, data and
metrics; Accelerate and the backend (backend/) supply devices, sharding and precision; the semantics of a step are
Ultralytics' (optim.py). What the run derives from its settings (batch, accumulation, checkpointed layers...) is its
plan (run_plan.py); what a checkpoint holds is `self.pieces()`: objects with state_dict/load_state_dict (state.py).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file
from ultralytics.utils.torch_utils import init_seeds

from yoloscale import backend
from yoloscale.backend.full_state import optimizer_names
from yoloscale.checkpoint import load_checkpoint, read_state, save_checkpoint, wait_for_writer
from yoloscale.checkpoint.background import BackgroundWriter
from yoloscale.config import TrainConfig, load_config
from yoloscale.distributed.collective import any_rank, largest_on_any_rank
from yoloscale.distributed.liveness import Heartbeat
from yoloscale.errors import UserError
from yoloscale.memory.grad_ckpt import apply_grad_ckpt
from yoloscale.memory.model import peak_report
from yoloscale.memory.oom import OutOfMemory, does_not_fit, free_memory, next_batch, reached_gib
from yoloscale.memory.planner import plan_memory
from yoloscale.speed.compile import CompileWatch, speed_up
from yoloscale.speed.cudnn import Autotune
from yoloscale.sweep.trial import TRIAL_ENV, TrialReporter
from yoloscale.training import build
from yoloscale.training.data import (
    build_dataset,
    build_train_loader,
    build_val_loader,
    class_weights,
    largest_imgsz,
    rescale_batch,
    write_args_yaml,
)
from yoloscale.training.distill import Distillation, read_teacher, teacher_bytes
from yoloscale.training.ema import ShardedEMA, full_model_state
from yoloscale.training.export import RunWeights
from yoloscale.training.model import freeze_layers
from yoloscale.training.optim import (
    Schedule,
    build_optimizer,
    choose_optimizer,
    hyperparameters,
    restore_hyperparameters,
    scaled_weight_decay,
)
from yoloscale.training.plots import draw_batch, draw_labels, sample_batches
from yoloscale.training.preemption import Preempted, StopSignal, requeue_slurm_job
from yoloscale.training.run_dir import (
    describe_changes,
    remove_unused_run_dir,
    update_run_info,
    write_run_info,
)
from yoloscale.training.run_log import RunLog, StartupClock, results_row
from yoloscale.training.run_plan import make_plan
from yoloscale.training.state import LossMeter, Progress, StepHealth, TrainingTime
from yoloscale.training.validate import RESULT_COLUMNS, Validator

OOM_RETRIES = 3  # as Ultralytics' trainer


class TrainingDiverged(UserError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient norm."""


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.run_lock = None
        try:
            self._build(cfg)
        except BaseException:
            # a run refused before it wrote anything (bad data, a model that does not build...) leaves no folder
            if self.run_lock is not None and not cfg.resume and hasattr(self, "run_dir"):
                remove_unused_run_dir(self.run_dir, self.run_lock)
            raise

    def _build(self, cfg: TrainConfig) -> None:
        """Everything a run is built from, in order."""
        self.cfg = cfg
        self.startup = StartupClock()  # where the time to the first optimizer step goes (logged then)
        # --- devices and backend; the run directory, claimed by rank 0; the heartbeat ----------------------------
        self.backend, self.accelerator, requested = build.devices(cfg)
        acc = self.accelerator
        self.world, self.is_main = acc.num_processes, acc.is_main_process
        self.device = acc.device
        self.use_cuda = self.device.type == "cuda"
        init_seeds(cfg.seed, deterministic=cfg.deterministic)  # Ultralytics' seeding, and its deterministic mode
        self.run_dir, self.run_lock, job = build.run_directory(cfg, acc)
        self.log = RunLog(cfg, self.run_dir, enabled=self.is_main)
        # a frozen or lost rank ends the job within heartbeat_s, naming it (liveness.py)
        self.heartbeat = Heartbeat(acc.process_index, self.world, cfg.heartbeat_s, job).start()
        self.startup.mark("devices")

        # --- data description; the model, its initial weights, a plain copy for validation and export -----------
        self.data, data_yaml, self.args = build.data_description(cfg, acc)
        self.weights = RunWeights(self.run_dir, self.args)  # weights/: best, epoch{N}.pt, last; .pt for Ultralytics
        # sealing checkpoints and exporting weights run on the main rank's writer thread while training goes on
        self.writer = BackgroundWriter()
        spec, model, weights_report, head_nc = build.model(cfg, self.data, self.args, self.run_dir, self.is_main)
        frozen = freeze_layers(model, cfg.freeze)  # Ultralytics' freeze= (and DFL, always)
        self.stride = stride = max(int(model.stride.max()), 32)
        teacher = read_teacher(cfg.distill_model, cfg.trust_pickle)  # knowledge distillation (distill.py)
        # batch=auto and grad_ckpt=auto: measured on this device (planner.py); multi_scale plans its largest batches
        largest = largest_imgsz(cfg.imgsz, cfg.multi_scale, stride)
        memory = plan_memory(
            dataclasses.replace(cfg, imgsz=largest),
            spec,
            model,
            acc,
            self.backend.precision_name,
            self.data["nc"],
            requested,
            teacher_bytes(teacher),
        )
        self.memory_model = memory.fit  # what the run's real peak is compared with
        self.eval_model = copy.deepcopy(model).eval().requires_grad_(False).to(acc.device)  # gets the EMA's weights
        self.speed_ups = speed_up(model, cfg)  # torch.compile (compile.py)
        self.compile_watch = CompileWatch(enabled=cfg.compile != "off")
        ckpt_layers = apply_grad_ckpt(model, memory.grad_ckpt, cfg.grad_ckpt_recompute)  # around compiled layers
        # the projectors join the student before the optimizer sees it; the teacher stays outside every checkpoint
        self.distill = Distillation(teacher, model, cfg.dis, acc.device, 2 * stride) if teacher else None
        self.startup.mark("model")

        # --- data sets (the main process first: it writes Ultralytics' label caches), the run plan, loaders ------
        with self.heartbeat.main_first(acc, "datasets"):
            self.train_set, val_set, device_batch = build.datasets(
                cfg, self.args, self.data, memory.device_batch, not requested, self.world, stride
            )
        train_loader = self._train_loader(device_batch)
        # what the run chose itself (batch=auto, cut to a small data set if need be): config.yaml records it
        decided = {"device_batch": device_batch, "grad_ckpt": memory.grad_ckpt} if memory.planned else {}
        self.plan = make_plan(
            cfg,
            self.backend.precision_name,
            self.world,
            device_batch,
            ckpt_layers,
            memory.grad_ckpt,
            len(train_loader),
            decided,
        )
        self.train_loader = train_loader
        self.backend.set_device_batch(acc, device_batch, self.world)  # DeepSpeed's copy of it
        val_loader = build_val_loader(val_set, cfg, self.plan.val_batch, acc.process_index, self.world, self.use_cuda)
        self.validator = Validator(self.args, self.data, val_loader, self.run_dir, self.world)
        self.startup.mark("data")

        # --- optimizer and schedule, Ultralytics' rules (optim.py) -----------------------------------------------
        chosen = read_state(Path(cfg.resume))["progress"].get("optimizer", "") if cfg.resume else ""
        self.choice = choose_optimizer(cfg, len(self.train_set), self.data["nc"], self.batch, chosen)
        # what exported checkpoints record as their training arguments, as Ultralytics' trainer records them
        self.args.optimizer, self.args.lr0 = self.choice.name, self.choice.lr0
        self.args.warmup_bias_lr = self.choice.warmup_bias_lr
        self.weight_decay = scaled_weight_decay(cfg, self.batch, self.plan.nominal_accumulate)
        model = self.backend.wrap(acc, model)  # SyncBN; FSDP2 shards here, before the optimizer sees the model
        fused, sharded = self.backend.enable_fused_optimizer(), self.backend.sharded
        optimizer = build_optimizer(model, self.choice, self.weight_decay, fused=fused, sharded=sharded)
        self.group_names = optimizer_names(model, optimizer)  # resuming another backend's checkpoint needs them
        self.model, self.optimizer = self.backend.prepare(acc, model, optimizer)
        self.raw_model = backend.unwrap(self.model)
        # Ultralytics' criterion takes its device (and Detect's strides) from the model's parameters: built from the
        # plain copy on the compute device, as with offload=params the trained model's parameters are in CPU memory.
        if cfg.cls_pw:  # Ultralytics' class weights: its loss reads them from the model it is built from
            self.eval_model.class_weights = class_weights(self.train_set, self.data["nc"], cfg.cls_pw).to(acc.device)
        self.criterion = self.eval_model.init_criterion()
        self.ema = ShardedEMA(self.raw_model, decay=cfg.ema_decay, tau=cfg.ema_tau) if cfg.ema else None
        self.schedule = Schedule.create(cfg, self.choice, len(self.train_loader), self.plan.accumulate)
        self.channels_last = cfg.channels_last and self.use_cuda
        self.autotune = Autotune(cfg.cudnn_benchmark, self.use_cuda)

        # --- the resumable state (state.py), logging, signals -------------------------------------------------
        self.progress = Progress(
            world_size=self.world, device_batch=self.device_batch, backend=cfg.backend, optimizer=self.choice.name
        )
        self.health = StepHealth(self.device)
        self.clock = TrainingTime(cfg.time, cfg.epochs)  # time=: the epochs its budget allows
        self.interval_losses, self.epoch_losses = LossMeter(self.device), LossMeter(self.device)
        self.stop_signal = StopSignal()
        # a trial of `yoloscale sweep`: each epoch's objective goes to the study, whose pruner may stop the run
        self.in_sweep = TRIAL_ENV in os.environ
        self.sweep_trial = TrialReporter.from_environment() if self.in_sweep and self.is_main else None
        self.first_step_s: float | None = None
        self.on_micro_step: Callable[[], None] | None = None  # bench's timing hook: called after every micro-step
        self.oom_retries = 0
        if cfg.resume:
            self._resume(Path(cfg.resume))
            self._set_epochs(self.clock.epochs)
        elif self.is_main:
            self.plan.recorded(cfg).save(self.run_dir / "config.yaml")
            write_args_yaml(self.run_dir / "args.yaml", self.args)  # Ultralytics' record of the run
            model_file = str(Path(spec).resolve()) if isinstance(spec, str) and Path(spec).is_file() else spec
            write_run_info(
                self.run_dir,
                {"model": model_file, "data": str(data_yaml), "names": self.data["names"], "imgsz": cfg.imgsz}
                | ({"head_nc": head_nc} if head_nc else {}),
            )
        if self.is_main:
            self.plan.save(self.run_dir / "plan.yaml")
        self.sample_batches = set()  # micro-batches drawn as train_batch{N}.jpg (plots.py)
        if cfg.plots and self.is_main:
            self.sample_batches = sample_batches(self.clock.epochs, cfg.close_mosaic, len(self.train_loader))
            if not cfg.resume:
                self.writer.submit(partial(draw_labels, self.train_set, self.data["names"], self.run_dir))
        for note in (memory.note, weights_report):
            if note:
                self.log.message(note)
        if cfg.freeze:
            self.log.message(f"freeze={cfg.freeze}: {frozen} parameter tensors keep their initial values")
        if self.plan.accumulate < self.plan.nominal_accumulate:
            self.log.message(
                f"accumulate capped at {self.plan.accumulate}: an epoch has only {len(train_loader)} batches"
            )
        self.log.message(self._describe(len(model.model)))
        # the loader's workers start on the first batches now, while the run gets ready for its first step
        self._close_mosaic_if_due()
        self.train_loader.start(self.progress.epoch, self.progress.batch_in_epoch)
        self.startup.mark("optimizer")

    @property
    def device_batch(self) -> int:
        return self.plan.device_batch

    @property
    def batch(self) -> int:
        """The global batch: images per micro-step over all devices."""
        return self.plan.batch

    def predicted_peak(self, device_batch: int = 0) -> float:
        """The memory model's peak (bytes) for the run at `device_batch` (0: as it trains now) with its checkpointed
        layers; 0 without a model."""
        cfg, fit = self.cfg, self.memory_model
        if fit is None:
            return 0.0
        imgsz = largest_imgsz(cfg.imgsz, cfg.multi_scale, self.stride)  # multi_scale: its largest batches
        batch = device_batch or self.device_batch
        return fit.peak(batch, imgsz, list(self.plan.ckpt_layers), cfg.backend, self.world, cfg.offload)

    def pieces(self) -> dict:
        """What a checkpoint holds besides the backend's state: name -> object with state_dict/load_state_dict."""
        pieces = {
            "progress": self.progress,
            "health": self.health,
            "epoch_losses": self.epoch_losses,
            "training_time": self.clock,
        }
        return pieces if self.ema is None else {**pieces, "ema": self.ema}

    def _describe(self, layers: int) -> str:
        cfg, c, plan, schedule = self.cfg, self.choice, self.plan, self.schedule
        recompute = f" (recompute={cfg.grad_ckpt_recompute})" if plan.ckpt_layers else ""
        ramp = " (from 1 during warmup)" if schedule.warmup_batches and schedule.accumulate > 1 else ""
        return (
            f"yoloscale: {self.world} process(es) on {self.device.type}, backend={cfg.backend}, precision="
            f"{plan.precision}, gradient checkpointing on {len(plan.ckpt_layers)} of {layers} layers{recompute}; "
            f"batch {plan.batch} = {plan.device_batch}/device x {self.world}, accumulate {schedule.accumulate}{ramp}; "
            f"{c.reason or f'optimizer {c.name}'}: lr0 {c.lr0:g}, weight_decay {self.weight_decay:.4g}; "
            f"{self.speed_ups + '; ' if self.speed_ups else ''}run directory {self.run_dir}"
        )

    # ------------------------------------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Run the remaining epochs; returns the last validation metrics."""
        metrics: dict[str, float] = {}
        self.stop_signal.install()  # SIGUSR1/SIGTERM: checkpoint at the next logging interval, then stop
        first_epoch = self.progress.epoch
        try:
            while self.progress.epoch < self.clock.epochs and not self.progress.early_stopped:
                start = time.perf_counter()
                try:
                    images = self.train_epoch()
                except OutOfMemory as e:
                    self._retry_smaller(first_epoch, e)
                    continue
                metrics = self.end_epoch(images / max(time.perf_counter() - start, 1e-9), metrics)
            self._finish(metrics)
        finally:
            self.writer.close()  # a started seal or export finishes (its error, if any, was raised at a wait)
            self.stop_signal.uninstall()
            self.heartbeat.stop()
            if self.run_lock is not None:
                self.run_lock.release()  # the run is over (or failed): the directory may be resumed
        return metrics

    def end_epoch(self, img_s: float, metrics: dict[str, float]) -> dict[str, float]:
        """E2E loss update, validation, best weights, early stopping, the metrics row and the epoch-end checkpoint."""
        cfg, pr = self.cfg, self.progress
        if hasattr(self.criterion, "update"):  # YOLO26's E2ELoss: once per epoch
            self.criterion.update()
        self._check_health()
        wait_for_writer(self.accelerator, self.writer)  # the last epoch's exports read the eval model: done first
        self._refresh_eval_model()  # collective under sharding
        out_of_time = bool(cfg.time) and self.clock.is_up(largest_on_any_rank(self.accelerator, self.clock.now()))
        final = pr.epoch + 1 >= self.clock.epochs or out_of_time
        if cfg.val or final:  # the final epoch always validates, with Ultralytics' plots
            metrics = self._validate(plots=final and cfg.plots)
        epoch = pr.epoch
        pr.epoch, pr.batch_in_epoch = pr.epoch + 1, 0
        improved = pr.note_best(metrics)
        if pr.out_of_patience(cfg.patience, metrics):
            pr.early_stopped = True
            self.log.message(
                f"early stopping: no better fitness for {cfg.patience} epochs (best at epoch "
                f"{pr.best_epoch}); patience=0 disables it"
            )
        if cfg.time:
            self._spend_time(out_of_time)
        if self.in_sweep and (cfg.val or final) and not pr.early_stopped:
            self._ask_sweep_pruner(metrics)
        self.log.epoch_end(self._epoch_row(metrics, img_s), step=pr.optimizer_steps)
        self.epoch_losses.reset()
        if note := self.compile_watch.epoch_end(pr.epoch):
            self.log.message(note)
        keep = cfg.save_period > 0 and epoch % cfg.save_period == 0  # Ultralytics' epoch{N}.pt, N 0-based
        if self.is_main:  # queued ahead of the checkpoint's seal: a kill never loses a best
            self.writer.submit(partial(self.weights.epoch_end, self.eval_model, epoch, metrics, improved, keep))
        self._checkpoint(epoch_end=True, keep_this=keep)
        return metrics

    def train_epoch(self) -> int:
        """One epoch (or what is left of it after a resume); returns the number of images processed."""
        cfg, pr = self.cfg, self.progress
        self._close_mosaic_if_due()
        self.clock.start_epoch()
        self.model.train()
        images, t_log, n_log = 0, time.perf_counter(), 0
        batches = self.train_loader.epoch(pr.epoch, skip=pr.batch_in_epoch)
        bar = self.log.epoch_bar(batches, len(self.train_loader), pr.epoch, self.clock.epochs)
        for batch in bar:
            if self.first_step_s is None:
                self.startup.mark("first batch")
            if pr.micro_step in self.sample_batches:  # its CPU tensors, before train_step moves the batch
                picture = self.run_dir / f"train_batch{pr.micro_step}.jpg"
                self.writer.submit(partial(draw_batch, dict(batch), picture))
            stepped = self.train_step(batch)
            pr.batch_in_epoch += 1
            if self.on_micro_step is not None:
                self.on_micro_step()
            if note := self.autotune.tick(self.clock.epochs * len(self.train_loader) - pr.micro_step):
                self.log.message(note)
            n = batch["img"].shape[0] * self.world
            images, n_log = images + n, n_log + n
            if stepped and self.first_step_s is None:
                self._first_step_done()
            if stepped and pr.optimizer_steps % cfg.log_interval == 0:
                values = {"step": pr.optimizer_steps, **self.interval_losses.means()}  # the interval's host sync
                self.interval_losses.reset()
                values["lr"] = self.optimizer.param_groups[0]["lr"]
                self._check_health()
                now = time.perf_counter()
                values["img_s"] = n_log / (now - t_log)
                if self.use_cuda:
                    values["mem_GiB"] = torch.cuda.max_memory_reserved(self.device) / 2**30
                    if pr.optimizer_steps == cfg.log_interval:  # the plan, beside the truth
                        real = values["mem_GiB"] * 2**30
                        self.log.message(peak_report(real, self.predicted_peak(), pr.optimizer_steps))
                t_log, n_log = now, 0
                self.log.step(values, pr.optimizer_steps)
                self._stop_if_signalled()
                if cfg.time and any_rank(self.accelerator, self.clock.is_up(self.clock.now())):
                    break  # Ultralytics' time=: the epoch ends here, validates and saves as the final one
            if stepped and cfg.save_steps and pr.optimizer_steps % cfg.save_steps == 0:
                self._checkpoint()
        return images

    def train_step(self, batch: dict) -> bool:
        """Forward, loss and backward of one micro-batch; at the end of an accumulation window also clip, step
        (skipped on the device if the gradient norm is not finite) and update the EMA. Returns whether the optimizer
        stepped. No host synchronisation of ours (Ultralytics' loss has one: docs/benchmarks.md)."""
        acc, cfg, pr = self.accelerator, self.cfg, self.progress
        ni = pr.micro_step  # Ultralytics' batch index: the schedule's position
        self.schedule.apply(self.optimizer, ni, pr.epoch)
        sync = ni - pr.last_opt_step >= self.schedule.accumulate_at(ni)
        oom = None
        try:
            batch = self.prepare_batch(batch)
            with self.backend.micro_step(self.model, sync, acc):
                preds = self.model(batch["img"])  # autocast inside forward (Accelerate's, or DeepSpeed's)
                loss, loss_items = self.criterion(preds, batch)
                if self.distill is not None:  # the teacher's features, learnt through the projectors (distill.py)
                    loss, loss_items = self.distill.loss(loss, loss_items, batch["img"], acc.autocast)
                # Ultralytics: its loss is summed over the micro-batch, and x devices since DDP averages: the
                # gradient of the loss summed over every image since the last step (DeepSpeed steps in here).
                self.backend.backward(loss.sum() * self.world, self.model, sync, acc)
        except torch.OutOfMemoryError as e:
            oom = str(e)  # raised below, outside this block, so the failed forward's tensors are freed first
        if oom is not None:
            raise OutOfMemory(oom)
        pr.micro_step += 1
        self.interval_losses.add(loss_items)
        self.epoch_losses.add(loss_items)
        if not sync:
            return False
        self.health.record(self.backend.step(self.model, self.optimizer, cfg.grad_clip, acc))
        if self.ema is not None:
            self.ema.update(self.raw_model)
        pr.optimizer_steps += 1
        pr.last_opt_step = ni
        return True

    # --- helpers of the loop ---------------------------------------------------------------------------------------
    def prepare_batch(self, batch: dict) -> dict:
        """Move a collated batch to the device (non-blocking from pinned memory); images to float in [0, 1]."""
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                batch[k] = v.to(self.device, non_blocking=self.use_cuda)
        img = batch["img"].float() / 255
        if self.cfg.multi_scale:  # Ultralytics' multi-scale training: a random size per batch
            img = rescale_batch(img, self.cfg.imgsz, self.cfg.multi_scale, self.stride)
        batch["img"] = img.contiguous(memory_format=torch.channels_last) if self.channels_last else img
        return batch

    def _close_mosaic_if_due(self) -> None:
        """Ultralytics' close_mosaic: no mosaic in the final `close_mosaic` epochs. Loader workers already running
        hold the dataset as it was: such a loader is rebuilt."""
        cfg = self.cfg
        epochs = self.clock.epochs
        if cfg.close_mosaic and self.progress.epoch >= epochs - cfg.close_mosaic and self.args.mosaic > 0:
            self.log.message(f"closing mosaic for the last {cfg.close_mosaic} epochs")
            self.train_loader.dataset.close_mosaic(self.args)  # Ultralytics' own switch (zeroes mosaic/mixup/...)
            if self.train_loader.started:
                self.train_loader = self._train_loader()

    def _train_loader(self, device_batch: int = 0):
        return build_train_loader(
            self.train_set,
            self.cfg,
            device_batch or self.device_batch,
            self.accelerator.process_index,
            self.world,
            self.use_cuda,
        )

    def _checkpoint(self, epoch_end: bool = False, keep_this: bool = False, wait: bool = False) -> Path:
        """Collective. The skip count is read first, so the checkpoint holds the exact number. Its seal runs on the
        writer thread after the jobs queued before it (end_epoch waited for the older ones); `wait`: return only
        once it is complete."""
        self._check_health()
        if not epoch_end:  # a save within an epoch: the previous one is complete first (at most one in flight)
            wait_for_writer(self.accelerator, self.writer)
        path = save_checkpoint(
            self.accelerator,
            self.run_dir,
            self.progress.optimizer_steps,
            self.pieces(),
            epoch_end=epoch_end,
            keep=self.cfg.keep_checkpoints,
            keep_this=keep_this,
            writer=self.writer,
        )
        if wait:
            wait_for_writer(self.accelerator, self.writer)
        return path

    def _first_step_done(self) -> None:
        self.startup.mark("first step")
        self.first_step_s = self.startup.ends["first step"]
        if self.is_main:
            update_run_info(self.run_dir, first_step_s=round(self.first_step_s, 2), startup_s=self.startup.phases())
        self.log.message(self.startup.first_step_line())

    def _retry_smaller(self, first_epoch: int, error: OutOfMemory) -> None:
        """A CUDA out-of-memory error in the first epoch of a single-process run: restart the epoch with half the
        per-device batch and twice the accumulation (the global batch, lr and weight decay stay; BatchNorm sees
        half the images per forward), a new plan that config.yaml records for a resume. Otherwise, or after
        OOM_RETRIES, a one-line error with what would fit."""
        pr, cfg, old = self.progress, self.cfg, self.plan
        peak, total = reached_gib(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        free_memory(self.device)
        if self.world > 1 or pr.epoch != first_epoch or self.oom_retries >= OOM_RETRIES or old.device_batch == 1:
            raise UserError(
                does_not_fit(
                    old.device_batch,
                    old.batch,
                    self.world,
                    cfg.imgsz,
                    self.schedule.accumulate,
                    old.grad_ckpt,
                    self.device,
                    str(error),
                )
            )
        self.oom_retries += 1
        smaller = next_batch(old.device_batch, peak, self.predicted_peak if self.memory_model else None)
        accumulate = self.schedule.accumulate * old.device_batch // smaller
        self.plan = old.with_device_batch(smaller, accumulate)
        if cfg.rect:  # rect's shape groups are of the batch the set was built with
            self.train_set = build_dataset(self.args, self.data, "train", smaller, self.stride)
        self.train_loader = self._train_loader()
        self.schedule = Schedule.create(cfg, self.choice, len(self.train_loader), accumulate, self.clock.epochs)
        pr.device_batch, pr.batch_in_epoch, pr.micro_step, pr.last_opt_step = smaller, 0, 0, -1
        self.interval_losses.reset()
        self.epoch_losses.reset()
        if self.is_main:
            self.plan.recorded(cfg).save(self.run_dir / "config.yaml")
            self.plan.save(self.run_dir / "plan.yaml")
        self.log.message(
            f"CUDA out of memory at device_batch {old.device_batch} ({peak:.1f} of {total:.1f} GiB): retrying the "
            f"epoch with device_batch {smaller} and accumulate {accumulate} ({self.oom_retries}/{OOM_RETRIES}); "
            f"the images per optimizer step and the lr stay, BatchNorm now sees {smaller} images per "
            f"forward instead of {old.device_batch}"
        )

    def _spend_time(self, out_of_time: bool) -> None:
        """time=: after an epoch (pr.epoch counts it), the epochs the budget allows, with the schedule stretched or
        shrunk to them, as Ultralytics re-estimates; the run ends once the time is spent."""
        pr = self.progress
        before = self.clock.epochs
        self.clock.end_epoch(largest_on_any_rank(self.accelerator, self.clock.now()), pr.epoch)
        self._set_epochs(self.clock.epochs)
        if out_of_time:
            pr.early_stopped = True
            self.log.message(f"time={self.cfg.time:g} h spent after {pr.epoch} epochs: training ends here")
        elif self.clock.epochs != before:
            self.log.message(f"time={self.cfg.time:g} h: {self.clock.epochs} epochs at the mean epoch time so far")

    def _set_epochs(self, epochs: int) -> None:
        """The run's length in epochs (time= changes it): the schedule's learning-rate decay spans it."""
        if epochs != self.schedule.epochs:
            self.schedule = Schedule.create(
                self.cfg, self.choice, len(self.train_loader), self.schedule.accumulate, epochs
            )

    def _ask_sweep_pruner(self, metrics: dict[str, float]) -> None:
        """Collective. The main rank reports the epoch's objective to the sweep's study; when its pruner says so,
        every rank stops at this epoch's end (the epoch-end checkpoint and the weights are written as usual)."""
        pr = self.progress
        if not any_rank(
            self.accelerator, self.sweep_trial is not None and self.sweep_trial.should_stop(pr.epoch, metrics)
        ):
            return
        pr.early_stopped = True
        if self.is_main:
            update_run_info(self.run_dir, pruned_at_epoch=pr.epoch)
        self.log.message(f"pruned by the sweep after epoch {pr.epoch}: its objective trails the other trials")

    def _stop_if_signalled(self) -> None:
        """At a logging interval: if any rank got SIGUSR1/SIGTERM, all save a checkpoint here and stop together."""
        if not any_rank(self.accelerator, self.stop_signal.received is not None):
            return
        ckpt = self._checkpoint(wait=True)
        requeued = requeue_slurm_job() if self.is_main else None
        raise Preempted(
            f"stop signal received: checkpoint {ckpt} written"
            + (f"; {requeued}" if requeued else "")
            + f". Continue with resume={self.run_dir}"
        )

    def _check_health(self) -> None:
        """Every rank sees the same all-reduced gradient norm, so every rank raises here together."""
        worst, total = self.health.check()  # one host sync
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

    def _epoch_row(self, metrics: dict[str, float], img_s: float) -> dict:
        pr = self.progress
        ours = {"optimizer_steps": pr.optimizer_steps, "img_s": img_s, "skipped_steps": self.health.skipped()}
        groups = self.optimizer.param_groups
        return results_row(pr.epoch, self.epoch_losses.means(), metrics, RESULT_COLUMNS, groups, ours)

    def _validate(self, plots: bool = False) -> dict[str, float]:
        """Collective: the eval model on the val set, in fp16 where the run uses AMP (as Ultralytics validates)."""
        half = self.use_cuda and self.plan.precision != "fp32"
        return self.validator(self.eval_model, self.device, self.epoch_losses.names, half=half, plots=plots)

    def _finish(self, metrics: dict[str, float]) -> None:
        """Final EMA weights as safetensors, best/last as Ultralytics .pt, and the plots."""
        wait_for_writer(self.accelerator, self.writer)  # the last checkpoint is complete, the exports done
        self._refresh_eval_model()
        if self.is_main:
            self.weights.final(self.eval_model, metrics)  # leaves the best weights in the main rank's eval model
            update_run_info(self.run_dir, finished=True)
        self._plot_best()
        if self.is_main:
            self.log.message(f"done: weights in {self.weights.folder}")
        self.log.finish(self.cfg.plots)
        self.accelerator.wait_for_everyone()

    def _plot_best(self) -> None:
        """Collective. As Ultralytics ends a run: best.pt validated with its plots, unless the best epoch is the last
        (its validation made them)."""
        pr, best = self.progress, self.weights.folder / "best.safetensors"
        self.accelerator.wait_for_everyone()  # best.safetensors is written
        if not self.cfg.plots or pr.best_epoch in (0, pr.epoch) or not best.is_file():
            return
        if not self.is_main:
            self.eval_model.load_state_dict(load_file(str(best)))
        metrics = self._validate(plots=True)
        self.log.message(
            f"best.pt (epoch {pr.best_epoch}): mAP50 {metrics.get('mAP50', 0):.4f}, mAP50-95 "
            f"{metrics.get('mAP50-95', 0):.4f}; its plots in {self.run_dir}"
        )

    def _resume(self, ckpt: Path) -> None:
        pr = self.progress
        built = hyperparameters(self.optimizer)  # this run's lr0, momentum, weight decay: the checkpoint's replace them
        load_checkpoint(
            self.accelerator,
            ckpt,
            self.model,
            self.optimizer,
            self.backend,
            self.group_names,
            self.pieces(),
            partial(Progress.check_resumable, world=self.world, device_batch=self.device_batch, ckpt=ckpt),
            self.cfg.trust_pickle,
        )
        restore_hyperparameters(self.optimizer, built, self.schedule, self.choice, pr.micro_step)
        if pr.backend != self.cfg.backend:
            self.log.message(f"resuming a backend={pr.backend} checkpoint with backend={self.cfg.backend}")
        if hasattr(self.criterion, "update"):
            for _ in range(pr.epoch):  # replay E2ELoss's per-epoch schedule
                self.criterion.update()
        if self.is_main:  # the continuing run's settings (overrides such as epochs= included) for the next resume
            if changes := describe_changes(load_config(self.run_dir / "config.yaml"), self.cfg):
                self.log.message(changes)
            update_run_info(self.run_dir, finished=False)
            self.log.forget_epochs_after(pr.epoch)
            dataclasses.replace(self.plan.recorded(self.cfg), resume="").save(self.run_dir / "config.yaml")
        pr.world_size, pr.device_batch, pr.backend = self.world, self.device_batch, self.cfg.backend
        pr.optimizer = self.choice.name
        self.log.message(f"resumed from {ckpt}: epoch {pr.epoch + 1}, optimizer step {pr.optimizer_steps}")
