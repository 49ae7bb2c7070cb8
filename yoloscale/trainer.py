"""The training loop. Read top to bottom: `__init__` builds everything, `train()` runs epochs, `train_epoch()` one
epoch, `train_step()` one micro-batch. Ultralytics supplies the model, loss, data and metrics; Accelerate and the
backend (backend/) supply devices, sharding and precision; the semantics of a step are Ultralytics' (optim.py). What
a checkpoint holds is `self.pieces()`: objects with state_dict/load_state_dict (state.py).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from yoloscale import backend
from yoloscale.autotune import Autotune
from yoloscale.checkpoint import load_checkpoint, read_state, save_checkpoint, wait_for_writer
from yoloscale.checkpoint.background import BackgroundWriter
from yoloscale.checkpoint.full_state import optimizer_names
from yoloscale.collective import any_rank
from yoloscale.compile import CompileWatch, speed_up
from yoloscale.config import TrainConfig, load_config
from yoloscale.data import (
    build_dataset,
    build_train_loader,
    build_val_loader,
    check_dataset,
    class_weights,
    largest_imgsz,
    rescale_batch,
    synthetic_dataset,
    ultralytics_args,
    write_args_yaml,
)
from yoloscale.distill import Distillation, read_teacher, teacher_bytes
from yoloscale.ema import ShardedEMA, full_model_state
from yoloscale.errors import UserError
from yoloscale.export import RunWeights
from yoloscale.grad_ckpt import apply_grad_ckpt
from yoloscale.liveness import Heartbeat
from yoloscale.memory import OutOfMemory, does_not_fit, free_memory, next_batch, reached_gib
from yoloscale.model import build_model, freeze_layers, model_spec
from yoloscale.optim import (
    Schedule,
    build_optimizer,
    choose_optimizer,
    device_batch_of,
    hyperparameters,
    nominal_accumulate,
    restore_hyperparameters,
    scaled_weight_decay,
)
from yoloscale.plan import peak_report
from yoloscale.plots import draw_batch, draw_labels, sample_batches
from yoloscale.preemption import Preempted, StopSignal, requeue_slurm_job
from yoloscale.pretrained import initial_weights
from yoloscale.run_dir import (
    changes_on_resume,
    lock_run_dir,
    new_run_dir,
    read_run_info,
    remove_unused_run_dir,
    update_run_info,
    write_run_info,
)
from yoloscale.run_log import RunLog, seconds_since_start
from yoloscale.state import LossMeter, Progress, StepHealth, TrainingTime
from yoloscale.sweep.trial import TRIAL_ENV, TrialReporter
from yoloscale.validate import RESULT_COLUMNS, Validator

OOM_RETRIES = 3  # as Ultralytics' trainer
AUTO_SET = ("lr0", "momentum")  # what optimizer=auto decides instead of the configuration


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
        from accelerate.utils import broadcast_object_list
        from ultralytics.utils.torch_utils import init_seeds

        self.cfg = cfg
        # where the time to the first optimizer step goes: phase -> seconds since the command started (logged then)
        self.startup = {"imports": seconds_since_start()}
        # --- devices, precision, the batch per device -----------------------------------------------------------
        backend.distributed_env_from_slurm()
        world = int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's; Accelerate reads the same variable
        self.device_batch = device_batch_of(cfg, world)
        self.backend = backend.get(cfg)
        self.accelerator = acc = self.backend.build_accelerator(self.device_batch or 1)  # batch=auto: set below
        self.world, self.is_main = acc.num_processes, acc.is_main_process
        self.device = acc.device
        self.use_cuda = self.device.type == "cuda"
        init_seeds(cfg.seed, deterministic=cfg.deterministic)  # Ultralytics' seeding, and its deterministic mode

        # --- run directory: claimed by rank 0 (an exclusive lock for the run's life), shared with the others -----
        run, self.run_lock = [Path(cfg.project) / cfg.name, uuid.uuid4().hex], None
        if self.is_main:
            run[0], self.run_lock = (run[0], lock_run_dir(run[0])) if cfg.resume else new_run_dir(cfg)
        self.run_dir, job = broadcast_object_list(run) if self.world > 1 else run
        self.log = RunLog(cfg, self.run_dir, enabled=self.is_main)
        # a frozen or lost rank ends the job within heartbeat_s, naming it (liveness.py)
        self.heartbeat = Heartbeat(acc.process_index, self.world, cfg.heartbeat_s, job).start()
        self.startup["devices"] = seconds_since_start()

        # --- data description and Ultralytics' argument namespace --------------------------------------------
        if cfg.data == "synthetic":
            data_yaml = synthetic_dataset(Path(cfg.project), self.is_main, acc.wait_for_everyone)
        else:
            data_yaml = Path(cfg.data).resolve()
        self.data = check_dataset(data_yaml)
        if cfg.single_cls:  # Ultralytics' meaning: one class, named 'item' (its datasets map every label to it)
            self.data = {**self.data, "names": {0: "item"}, "nc": 1}
        self.args = ultralytics_args(cfg, data_yaml)
        self.weights = RunWeights(self.run_dir, self.args)  # weights/: best, epoch{N}.pt, last; .pt for Ultralytics
        # sealing checkpoints and exporting weights run on the main rank's writer thread while training goes on
        self.writer = BackgroundWriter()

        # --- model, its initial weights, a plain copy for validation and export -------------------------------
        spec = model_spec(cfg.model, cfg.trust_pickle)
        # a run fine-tuned from weights of another class count trains their class-branch widths (pretrained.py)
        head_nc = read_run_info(self.run_dir).get("head_nc", 0) if cfg.resume else 0
        nc, names = self.data["nc"], self.data["names"]
        model = build_model(spec, nc, names, self.args, self.is_main, cfg.trust_pickle, head_nc)
        weights_report = ""
        if not cfg.resume:
            weights_report, head_nc = initial_weights(
                model, cfg.model, cfg.weights, cfg.trust_pickle, cfg.pretrained, cfg.cls_remap
            )
        frozen = freeze_layers(model, cfg.freeze)  # Ultralytics' freeze= (and DFL, always)
        self.stride = stride = max(int(model.stride.max()), 32)
        self.memory_model, self.planned_layers = None, []  # the fit the run's peak is compared with (_plan_memory)
        teacher = read_teacher(cfg.distill_model, cfg.trust_pickle)  # knowledge distillation (distill.py)
        auto_batch = not self.device_batch  # batch=auto, a fraction or -1: planned now
        grad_ckpt = self._plan_memory(spec, model, reserved=teacher_bytes(teacher))
        self.eval_model = copy.deepcopy(model).eval().requires_grad_(False).to(acc.device)  # gets the EMA's weights
        self.speed_ups = speed_up(model, cfg)  # torch.compile (compile.py)
        self.compile_watch = CompileWatch(enabled=cfg.compile != "off")
        ckpt_layers = apply_grad_ckpt(model, grad_ckpt, cfg.grad_ckpt_recompute)  # around the compiled layers
        # the projectors join the student before the optimizer sees it; the teacher stays outside every checkpoint
        self.distill = Distillation(teacher, model, cfg.dis, acc.device, 2 * stride) if teacher else None
        self.startup["model"] = seconds_since_start()

        # --- data loaders (the main process first: it writes Ultralytics' label caches) ---------------------------
        with self.heartbeat.main_first(acc, "datasets"):
            self.train_set = build_dataset(self.args, self.data, "train", self.device_batch, stride)
            val_set = build_dataset(self.args, self.data, "val", cfg.val_batch or 2 * self.device_batch, stride)
        if auto_batch and self.device_batch > len(self.train_set) // self.world:  # batch=auto, small data
            self.device_batch = self.cfg.device_batch = max(len(self.train_set) // self.world, 1)
            self._regroup_rect()
        self.train_loader = self._train_loader()
        val_loader = build_val_loader(val_set, cfg, self.device_batch, acc.process_index, self.world, self.use_cuda)
        self.validator = Validator(self.args, self.data, val_loader, self.run_dir, self.world)
        self.startup["data"] = seconds_since_start()

        # --- optimizer and schedule, Ultralytics' rules (optim.py) -----------------------------------------------
        self.batch = self.device_batch * self.world  # the global batch
        chosen = read_state(Path(cfg.resume))["progress"].get("optimizer", "") if cfg.resume else ""
        self.choice = choose_optimizer(cfg, len(self.train_set), self.data["nc"], self.batch, chosen)
        # what exported checkpoints record as their training arguments, as Ultralytics' trainer records them
        self.args.optimizer, self.args.lr0 = self.choice.name, self.choice.lr0
        self.args.warmup_bias_lr = self.choice.warmup_bias_lr
        nominal = nominal_accumulate(cfg, self.batch, len(self.train_loader))
        self.weight_decay = scaled_weight_decay(cfg, self.batch, cfg.accumulate or max(round(cfg.nbs / self.batch), 1))
        model = self.backend.wrap(acc, model)  # SyncBN; FSDP2 shards here, before the optimizer sees the model
        optimizer = build_optimizer(
            model, self.choice, self.weight_decay, fused=self.backend.fused_optimizer(), sharded=self.backend.sharded
        )
        self.group_names = optimizer_names(model, optimizer)  # resuming another backend's checkpoint needs them
        self.model, self.optimizer = self.backend.prepare(acc, model, optimizer)
        self.raw_model = backend.unwrap(self.model)
        # Ultralytics' criterion takes its device (and Detect's strides) from the model's parameters: built from the
        # plain copy on the compute device, as with offload=params the trained model's parameters are in CPU memory.
        if cfg.cls_pw:  # Ultralytics' class weights: its loss reads them from the model it is built from
            self.eval_model.class_weights = class_weights(self.train_set, self.data["nc"], cfg.cls_pw).to(acc.device)
        self.criterion = self.eval_model.init_criterion()
        self.ema = ShardedEMA(self.raw_model, decay=cfg.ema_decay, tau=cfg.ema_tau) if cfg.ema else None
        self.schedule = Schedule.create(cfg, self.choice, len(self.train_loader), nominal)
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
        if cfg.resume:
            self._resume(Path(cfg.resume))
            self._set_epochs(self.clock.epochs)
        elif self.is_main:
            cfg.save(self.run_dir / "config.yaml")
            write_args_yaml(self.run_dir / "args.yaml", self.args)  # Ultralytics' record of the run
            model_file = str(Path(spec).resolve()) if isinstance(spec, str) and Path(spec).is_file() else spec
            write_run_info(
                self.run_dir,
                {"model": model_file, "data": str(data_yaml), "names": self.data["names"], "imgsz": cfg.imgsz}
                | ({"head_nc": head_nc} if head_nc else {}),
            )
        self.sample_batches = set()  # micro-batches drawn as train_batch{N}.jpg (plots.py)
        if cfg.plots and self.is_main:
            self.sample_batches = sample_batches(self.clock.epochs, cfg.close_mosaic, len(self.train_loader))
            if not cfg.resume:
                self.writer.submit(partial(draw_labels, self.train_set, self.data["names"], self.run_dir))
        if weights_report:
            self.log.message(weights_report)
        if cfg.freeze:
            self.log.message(f"freeze={cfg.freeze}: {frozen} parameter tensors keep their initial values")
        if nominal < (cfg.accumulate or max(round(cfg.nbs / self.batch), 1)):
            self.log.message(f"accumulate capped at {nominal}: an epoch has only {len(self.train_loader)} batches")
        self.log.message(self._describe(len(ckpt_layers), len(model.model)))
        # the loader's workers start on the first batches now, while the run gets ready for its first step
        self._close_mosaic_if_due()
        self.train_loader.start(self.progress.epoch, self.progress.batch_in_epoch)
        self.startup["optimizer"] = seconds_since_start()

    def _plan_memory(self, spec, model, reserved: float = 0.0) -> str:
        """batch=auto (or a fraction, or -1) and grad_ckpt=auto, from the memory model measured on this device
        (planner.py); config.yaml records what was chosen, so a resume trains the same. Returns the grad_ckpt to
        apply."""
        from yoloscale.grad_ckpt import select_layers
        from yoloscale.planner import plan_run

        cfg = self.cfg
        if self.device_batch and cfg.grad_ckpt != "auto":
            if self.use_cuda:  # a fixed batch: its peak is compared with a memory model only where one is cached
                from yoloscale.planner import cached_fit

                self.memory_model = cached_fit(cfg, spec, self.device, self.backend.precision_name, self.data["nc"])
                self.planned_layers = select_layers(model, cfg.grad_ckpt)
            return cfg.grad_ckpt
        named = [] if cfg.grad_ckpt == "auto" else select_layers(model, cfg.grad_ckpt)
        # multi_scale: planned for its largest batches (Ultralytics' AutoBatch does the same)
        largest = largest_imgsz(cfg.imgsz, cfg.multi_scale, self.stride)
        batch, layers, fit, peak = plan_run(
            dataclasses.replace(cfg, imgsz=largest) if cfg.multi_scale else cfg,
            spec,
            model,
            self.accelerator,
            self.backend.precision_name,
            self.data["nc"],
            self.world,
            self.device_batch,
            named,
            reserved,
        )
        self.device_batch, self.memory_model, self.planned_layers = batch, fit, layers
        if self.use_cuda:  # the measurement's own steps are not the run's peak
            torch.cuda.reset_peak_memory_stats(self.device)
        self.backend.set_device_batch(self.accelerator, batch, self.world)
        grad_ckpt = ",".join(map(str, layers)) if layers else "off"
        cfg.device_batch, cfg.grad_ckpt = batch, grad_ckpt
        self.log.message(
            f"batch={cfg.batch}: device_batch {batch}, grad_ckpt={grad_ckpt} ({len(layers)} layers); "
            f"predicted peak {peak / 2**30:.1f} GiB on {self.device}"
        )
        return grad_ckpt

    def predicted_peak(self, device_batch: int = 0) -> float:
        """The memory model's peak (bytes) for the run at `device_batch` (0: as it trains now) with its checkpointed
        layers; 0 without a model."""
        cfg, fit = self.cfg, self.memory_model
        if fit is None:
            return 0.0
        imgsz = largest_imgsz(cfg.imgsz, cfg.multi_scale, self.stride)  # multi_scale: its largest batches
        batch = device_batch or self.device_batch
        return fit.peak(batch, imgsz, self.planned_layers, cfg.backend, self.world, cfg.offload)

    def pieces(self) -> dict:
        """What a checkpoint holds besides the backend's state: name -> object with state_dict/load_state_dict."""
        pieces = {
            "progress": self.progress,
            "health": self.health,
            "epoch_losses": self.epoch_losses,
            "training_time": self.clock,
        }
        return pieces if self.ema is None else {**pieces, "ema": self.ema}

    def _describe(self, ckpt_layers: int, layers: int) -> str:
        cfg, c = self.cfg, self.choice
        return (
            f"yoloscale: {self.world} process(es) on {self.device.type}, backend={cfg.backend}, precision="
            f"{self.backend.precision_name}, gradient checkpointing on {ckpt_layers} of {layers} layers"
            f"{f' (recompute={cfg.grad_ckpt_recompute})' if ckpt_layers else ''}; batch {self.batch} = "
            f"{self.device_batch}/device x {self.world}, accumulate {self.schedule.accumulate}"
            f"{' (from 1 during warmup)' if self.schedule.warmup_batches and self.schedule.accumulate > 1 else ''}; "
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
        out_of_time = bool(cfg.time) and self.clock.is_up(self._slowest(self.clock.now()))
        final = pr.epoch + 1 >= self.clock.epochs or out_of_time
        if cfg.val or final:  # the final epoch always validates, with Ultralytics' plots
            metrics = self._validate(plots=final and cfg.plots)
        epoch = pr.epoch
        pr.epoch, pr.batch_in_epoch = pr.epoch + 1, 0
        improved = self._note_best(metrics)
        if cfg.patience and pr.epoch - pr.best_epoch >= cfg.patience and "fitness" in metrics:
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
                self.startup.setdefault("first batch", seconds_since_start())
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

    def _regroup_rect(self) -> None:
        """rect: the dataset's shape groups are of the device batch it was built with; after a change, rebuilt."""
        if self.cfg.rect:
            self.train_set = build_dataset(self.args, self.data, "train", self.device_batch, self.stride)

    def _train_loader(self):
        return build_train_loader(
            self.train_set, self.cfg, self.device_batch, self.accelerator.process_index, self.world, self.use_cuda
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
        self.first_step_s = self.startup["first step"] = seconds_since_start()
        ends = list(self.startup.items())
        took = {phase: round(t - (ends[i - 1][1] if i else 0.0), 2) for i, (phase, t) in enumerate(ends)}
        if self.is_main:
            update_run_info(self.run_dir, first_step_s=round(self.first_step_s, 2), startup_s=took)
        self.log.message(
            f"first optimizer step {self.first_step_s:.1f} s after the command started ("
            + ", ".join(f"{phase} {t:.1f}" for phase, t in took.items())
            + " s)"
        )

    def _retry_smaller(self, first_epoch: int, error: OutOfMemory) -> None:
        """A CUDA out-of-memory error in the first epoch of a single-process run: restart the epoch with half the
        per-device batch and twice the accumulation (the global batch, lr and weight decay stay; BatchNorm sees
        half the images per forward); config.yaml records it for a resume. Otherwise, or after OOM_RETRIES, a
        one-line error with what would fit."""
        pr, cfg = self.progress, self.cfg
        peak, total = reached_gib(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        free_memory(self.device)
        retries = getattr(self, "_oom_retries", 0)
        if self.world > 1 or pr.epoch != first_epoch or retries >= OOM_RETRIES or self.device_batch == 1:
            raise UserError(
                does_not_fit(
                    self.device_batch,
                    self.batch,
                    self.world,
                    cfg.imgsz,
                    self.schedule.accumulate,
                    cfg.grad_ckpt,
                    self.device,
                    str(error),
                )
            )
        self._oom_retries = retries + 1
        old, self.device_batch = (
            self.device_batch,
            next_batch(self.device_batch, peak, self.predicted_peak if self.memory_model else None),
        )
        self._regroup_rect()
        self.train_loader = self._train_loader()
        accumulate = self.schedule.accumulate * old // self.device_batch
        self.schedule = Schedule.create(cfg, self.choice, len(self.train_loader), accumulate, self.clock.epochs)
        self.batch = self.device_batch * self.world
        pr.device_batch, pr.batch_in_epoch, pr.micro_step, pr.last_opt_step = self.device_batch, 0, 0, -1
        self.interval_losses.reset()
        self.epoch_losses.reset()
        cfg.device_batch, cfg.accumulate = self.device_batch, accumulate
        cfg.save(self.run_dir / "config.yaml")
        self.log.message(
            f"CUDA out of memory at device_batch {old} ({peak:.1f} of {total:.1f} GiB): retrying the epoch with "
            f"device_batch {self.device_batch} and accumulate {accumulate} ({self._oom_retries}/{OOM_RETRIES}); "
            f"the images per optimizer step and the lr stay, BatchNorm now sees {self.device_batch} images per "
            f"forward instead of {old}"
        )

    def _slowest(self, seconds: float) -> float:
        """Collective: the largest of the ranks' values (one decision for all)."""
        if self.world == 1:
            return seconds
        return self.accelerator.reduce(torch.tensor(seconds, device=self.device), reduction="max").item()

    def _spend_time(self, out_of_time: bool) -> None:
        """time=: after an epoch (pr.epoch counts it), the epochs the budget allows, with the schedule stretched or
        shrunk to them, as Ultralytics re-estimates; the run ends once the time is spent."""
        pr = self.progress
        before = self.clock.epochs
        self.clock.end_epoch(self._slowest(self.clock.now()), pr.epoch)
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
        """results.csv's row: Ultralytics' columns in its order (epoch, time, train losses, precision, recall, mAPs,
        val losses, each parameter group's lr), then ours."""
        pr = self.progress
        row = {"epoch": pr.epoch, "time": round(seconds_since_start(), 2)}
        row.update({f"train/{k}": v for k, v in self.epoch_losses.means().items()})
        row.update(
            {RESULT_COLUMNS[k]: metrics[k] for k in ("precision", "recall", "mAP50", "mAP50-95") if k in metrics}
        )
        row.update({f"val/{k}": v for k, v in metrics.items() if k not in RESULT_COLUMNS})
        row.update({f"lr/pg{i}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)})
        row.update(optimizer_steps=pr.optimizer_steps, img_s=img_s, skipped_steps=self.health.skipped())
        if "fitness" in metrics:
            row["fitness"] = metrics["fitness"]
        return row

    def _note_best(self, metrics: dict[str, float]) -> bool:
        """Whether this epoch's fitness is the best so far (then recorded as such)."""
        fitness = metrics.get("fitness")
        if fitness is None or fitness <= self.progress.best_fitness:
            return False
        self.progress.best_fitness, self.progress.best_epoch = fitness, self.progress.epoch
        return True

    def _validate(self, plots: bool = False) -> dict[str, float]:
        """Collective: the eval model on the val set, in fp16 where the run uses AMP (as Ultralytics validates)."""
        half = self.use_cuda and self.backend.precision_name != "fp32"
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
            from safetensors.torch import load_file

            self.eval_model.load_state_dict(load_file(str(best)))
        metrics = self._validate(plots=True)
        self.log.message(
            f"best.pt (epoch {pr.best_epoch}): mAP50 {metrics.get('mAP50', 0):.4f}, mAP50-95 "
            f"{metrics.get('mAP50-95', 0):.4f}; its plots in {self.run_dir}"
        )

    def _resume(self, ckpt: Path) -> None:
        def check(saved: dict) -> None:
            if saved.get("batch_in_epoch") and (saved.get("world_size"), saved.get("device_batch")) != (
                self.world,
                self.device_batch,
            ):
                raise UserError(
                    f"checkpoint '{ckpt}' was saved mid-epoch with {saved.get('world_size')} process(es) x "
                    f"device_batch {saved.get('device_batch')}; resume it with the same, or from an epoch-end "
                    f"checkpoint (now {self.world} x {self.device_batch})."
                )

        built = hyperparameters(self.optimizer)  # this run's lr0, momentum, weight decay: the checkpoint's replace them
        load_checkpoint(
            self.accelerator,
            ckpt,
            self.model,
            self.optimizer,
            self.backend,
            self.group_names,
            self.pieces(),
            check,
            self.cfg.trust_pickle,
        )
        pr = self.progress
        restore_hyperparameters(self.optimizer, built, self.schedule, self.choice, pr.micro_step)
        if pr.backend != self.cfg.backend:
            self.log.message(f"resuming a backend={pr.backend} checkpoint with backend={self.cfg.backend}")
        if hasattr(self.criterion, "update"):
            for _ in range(pr.epoch):  # replay E2ELoss's per-epoch schedule
                self.criterion.update()
        if self.is_main:  # the continuing run's settings (overrides such as epochs= included) for the next resume
            if changes := changes_on_resume(load_config(self.run_dir / "config.yaml"), self.cfg):
                auto = self.cfg.optimizer == "auto"  # which, as in a new run, chooses lr0 and momentum itself
                self.log.message(
                    "resume applies changed settings: "
                    + ", ".join(
                        f"{k} {a!r} -> {b!r}"
                        + (" (unused: optimizer=auto chooses it)" if auto and k in AUTO_SET else "")
                        for k, (a, b) in changes.items()
                    )
                )
            update_run_info(self.run_dir, finished=False)
            self.log.forget_epochs_after(pr.epoch)
            self.cfg.resume = ""
            self.cfg.save(self.run_dir / "config.yaml")
            self.cfg.resume = str(ckpt)
        pr.world_size, pr.device_batch, pr.backend = self.world, self.device_batch, self.cfg.backend
        pr.optimizer = self.choice.name
        self.log.message(f"resumed from {ckpt}: epoch {pr.epoch + 1}, optimizer step {pr.optimizer_steps}")
