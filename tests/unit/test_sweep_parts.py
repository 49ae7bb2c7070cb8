"""The pieces of `yoloscale sweep` without training: the search space, the slots, what a run directory says about a
trial, and who owns a running trial."""

import json
import socket
import time
from types import SimpleNamespace

import pytest

from helpers import run_cli
from yoloscale.errors import UserError
from yoloscale.sweep.scheduler import make_slots
from yoloscale.sweep.space import check_with_base, load_space, override
from yoloscale.sweep.study import is_stale
from yoloscale.sweep.trial import read_outcome


def _space(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_the_documented_space_reads_into_optuna_distributions(tmp_path):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space = load_space(
        _space(
            tmp_path,
            "lr0: {type: float, low: 0.001, high: 0.02, log: true}\n"
            "mosaic: {type: float, low: 0.5, high: 1.0}\n"
            "imgsz: {type: int, low: 320, high: 640, step: 32}\n"
            "fliplr: [0.0, 0.5]\n"
            "model: {type: categorical, choices: [yolo11n.yaml, yolo11s.yaml]}\n",
        )
    )
    d = space.distributions
    assert d["lr0"] == FloatDistribution(0.001, 0.02, log=True)
    assert d["mosaic"] == FloatDistribution(0.5, 1.0)
    assert d["imgsz"] == IntDistribution(320, 640, step=32)
    assert d["fliplr"] == CategoricalDistribution((0.0, 0.5))
    assert list(d) == ["lr0", "mosaic", "imgsz", "fliplr", "model"]
    assert override("lr0", 0.0123456789) == "lr0=0.0123456789" and override("imgsz", 352) == "imgsz=352"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "mosaik: {type: float, low: 0.5, high: 1.0}\n",
            "line 1: unknown training key 'mosaik'. Did you mean 'mosaic'?",
        ),
        ("name: [a, b]\n", "key 'name' is set by the sweep"),
        ("lr0: {type: float, low: 0.02, high: 0.001}\n", "low (0.02) must be below high (0.001)"),
        ("lr0: {type: float, low: 0, high: 0.1, log: true}\n", "log: true needs low > 0"),
        ("lr0: {type: float, lo: 0.001, high: 0.1}\n", "unknown field(s) ['lo']"),
        ("lr0: {type: normal, low: 0.001, high: 0.1}\n", "give a list of choices or a mapping with type:"),
        ("lr0: [0.01]\nmosaic: {type: flot, low: 0.5, high: 1}\n", "line 2, key 'mosaic'"),
        ("mosaic: {type: flot, low: 0.5, high: 1}\n", "Did you mean type: float?"),
        ("imgsz: {type: int, low: 320.5, high: 640}\n", "space.yaml' line 1: key 'imgsz' expects int, got 320.5"),
        ("mosaic: {type: int, low: 0.5, high: 1}\n", "type int needs whole numbers"),
        ("epochs: [10, ten]\n", "key 'epochs' expects int, got 'ten'"),
        ("lr0: [0.01\n", "line 2: not valid YAML"),
        ("model: {type: float, low: 1, high: 2}\n", "not a numeric key"),
    ],
)
def test_a_bad_space_is_one_line_naming_file_and_key(tmp_path, text, message):
    with pytest.raises(UserError) as e:
        load_space(_space(tmp_path, text))
    assert message in str(e.value) and "space.yaml" in str(e.value)


def test_grid_needs_choices_or_steps_and_sweeping_lr0_needs_a_named_optimizer(tmp_path):
    space = load_space(_space(tmp_path, "imgsz: {type: int, low: 320, high: 384, step: 32}\nfliplr: [0.0, 0.5]\n"))
    assert space.grid("s") == {"imgsz": [320, 352, 384], "fliplr": [0.0, 0.5]} and space.grid_size("s") == 6
    with pytest.raises(UserError, match="sampler=grid needs a list of values or a step"):
        load_space(_space(tmp_path, "lr0: {type: float, low: 0.001, high: 0.1}\n")).grid("s")
    lr = load_space(_space(tmp_path, "lr0: {type: float, low: 0.001, high: 0.1}\n"))
    with pytest.raises(UserError, match="optimizer=auto picks its own lr0"):
        check_with_base(lr, "auto", "s")
    check_with_base(lr, "SGD", "s")  # a named optimizer takes the sampled lr0


def test_slots_share_the_gpus_and_the_cores():
    slots = make_slots("0,1,2,3", trials_per_gpu=2, gpus_per_trial=1, workers=8, cores=16)
    assert [s.devices for s in slots] == ["0", "1", "2", "3"] * 2  # the first trials on different GPUs
    assert {(s.threads, s.workers, s.procs) for s in slots} == {(2, 2, 1)}
    ddp = make_slots("0,1,2,3", trials_per_gpu=1, gpus_per_trial=2, workers=8, cores=16)
    assert [(s.devices, s.procs, s.workers) for s in ddp] == [("0,1", 2, 4), ("2,3", 2, 4)]
    cpu = make_slots("cpu", trials_per_gpu=2, gpus_per_trial=1, workers=0, cores=2)
    assert [(s.devices, s.threads, s.workers) for s in cpu] == [("", 1, 0), ("", 1, 0)]
    with pytest.raises(UserError, match="do not split into groups of gpus_per_trial=2"):
        make_slots("0,1,2", 1, 2, 8)


def test_trials_per_gpu_auto_packs_trials_by_the_planned_peak(tmp_path, monkeypatch):
    from yoloscale.config import load_config
    from yoloscale.sweep import packing

    GiB = 2**30
    assert packing.trials_that_fit(10 * GiB, 80 * GiB, gpus=1, cores=32) == 6  # 72 GiB / 10.6
    assert packing.trials_that_fit(10 * GiB, 80 * GiB, gpus=2, cores=8) == 2  # two cores per trial
    assert packing.trials_that_fit(1 * GiB, 80 * GiB, gpus=1, cores=64) == packing.MAX_PER_GPU
    assert packing.trials_that_fit(90 * GiB, 80 * GiB, gpus=1, cores=8) == 1  # one, whatever the plan says

    space = load_space(
        _space(
            tmp_path,
            "imgsz: {type: int, low: 320, high: 640, step: 32}\nbatch: [8, 32]\n"
            "model: [yolov8n.yaml, yolov8s.yaml]\nlr0: {type: float, low: 0.001, high: 0.01}\n",
        )
    )
    base = load_config(None, ["imgsz=320", "batch=16", "optimizer=SGD"])
    largest = packing.largest_trial(base, space.distributions)
    assert [(c.model, c.imgsz, c.batch) for c in largest] == [("yolov8n.yaml", 640, 32), ("yolov8s.yaml", 640, 32)]

    peaks = {"yolov8n.yaml": 4 * GiB, "yolov8s.yaml": 9 * GiB}
    monkeypatch.setattr(packing, "predicted_peak", lambda cfg: (peaks[cfg.model], 80 * GiB, cfg.model))
    n, why = packing.auto_trials_per_gpu(base, space.distributions, ["0", "1"], 1, cores=64)
    assert n == 7 and "yolov8s.yaml: a trial's predicted peak 9.0 GiB" in why  # the larger model bounds them
    assert packing.auto_trials_per_gpu(base, space.distributions, [], 1, 64)[0] == 1  # the CPU
    auto = load_config(None, ["batch=auto"])
    assert packing.auto_trials_per_gpu(auto, {}, ["0"], 1, 64) == (
        1,
        "trials_per_gpu=auto: 1 (batch=auto gives each trial the GPU's memory)",
    )
    bad = run_cli("sweep", str(_space(tmp_path, "fliplr: [0.5]\n")), "trials_per_gpu=two", f"out={tmp_path}/o")
    assert bad.returncode == 2 and "trials_per_gpu='two'; give a number >= 1 or auto" in bad.stderr


def _run_dir(tmp_path, rows, **info):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_info.json").write_text(json.dumps(info))
    lines = ["epoch,metrics/mAP50-95(B)"] + [f"{i + 1},{v}" for i, v in enumerate(rows)]
    (run / "results.csv").write_text("\n".join(lines) + "\n")
    return run


def test_outcomes_from_the_run_directory(tmp_path):
    log = tmp_path / "trial.log"
    log.write_text("Traceback ...\nyoloscale: error: key 'imgsz' must be > 0, got -1.\n")
    finished = _run_dir(tmp_path, [0.1, 0.3], finished=True)
    o = read_outcome(finished, 0, log, "mAP50-95")
    assert (o.state, o.value, o.epochs) == ("complete", 0.3, 2)
    (finished / "run_info.json").write_text(json.dumps({"finished": True, "pruned_at_epoch": 2}))
    assert read_outcome(finished, 0, log, "mAP50-95").state == "pruned"
    failed = read_outcome(tmp_path / "missing", 2, log, "mAP50-95")
    assert failed.state == "failed" and failed.error.startswith("key 'imgsz' must be > 0, got -1. (exit code 2")
    (finished / "run_info.json").write_text(json.dumps({}))
    assert read_outcome(finished, 0, log, "mAP50-95").state == "interrupted"  # stopped with its checkpoint
    assert read_outcome(finished, None, log, "mAP50-95").state == "interrupted"


def test_a_running_trial_is_stale_when_its_worker_is_gone():
    import psutil

    me = psutil.Process()
    host = socket.gethostname()

    def trial(**worker):
        attrs = {"worker": {"host": host, "pid": me.pid, "start": round(me.create_time(), 2), **worker}}
        return SimpleNamespace(user_attrs=attrs, datetime_start=None)

    assert not is_stale(trial())
    assert is_stale(trial(start=1.0))  # the pid now belongs to another process
    assert is_stale(trial(pid=2**22 + 12345))
    far = trial(host="elsewhere")
    far.user_attrs["heartbeat"] = time.time() - 10
    assert not is_stale(far)
    far.user_attrs["heartbeat"] = time.time() - 3600
    assert is_stale(far)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sweep"], "give the search space first"),
        (["sweep", "trials=4"], "give the search space first"),
        (["sweep", "SPACE", "trails=4"], "unknown key 'trails' for yoloscale sweep. Did you mean 'trials'?"),
        (["sweep", "SPACE", "sampler=bayes"], "key 'sampler' must be one of"),
        (["sweep", "SPACE", "objective=map"], "objective='map'"),
        (["sweep", "SPACE", "imgsz=-1"], "key 'imgsz' must be > 0"),
        (["sweep", "--status", "NOWHERE"], "holds no sweep"),
        (["launch", "slurm", "--sweep", "SPACE"], "give array=N"),
    ],
)
def test_bad_sweep_commands_are_one_line(tmp_path, argv, message):
    space = _space(tmp_path, "mosaic: {type: float, low: 0.5, high: 1.0}\n")
    argv = [str(space) if a == "SPACE" else str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in argv]
    proc = run_cli(*argv)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_the_grid_sampler_tries_every_combination_under_ask_and_tell(tmp_path):
    import optuna

    from yoloscale.sweep.study import build_pruner, build_sampler

    space = load_space(_space(tmp_path, "fliplr: [0.0, 0.5]\nmosaic: {type: float, low: 0.5, high: 1.0, step: 0.5}\n"))
    study = optuna.create_study(sampler=build_sampler("grid", 0, space.grid("s")), direction="maximize")
    seen = set()
    for _ in range(4):
        trial = study.ask(space.distributions)
        seen.add((trial.params["fliplr"], trial.params["mosaic"]))
        study.tell(trial, 0.5)  # Optuna's own GridSampler would raise here on the last one (study.stop())
    assert seen == {(0.0, 0.5), (0.0, 1.0), (0.5, 0.5), (0.5, 1.0)}
    assert isinstance(build_pruner("halving", 2, 3), optuna.pruners.SuccessiveHalvingPruner)
    assert isinstance(build_pruner("none", 1, 3), optuna.pruners.NopPruner)


@pytest.mark.parametrize(
    "tie_break, direction", [("val_loss", "maximize"), ("none", "maximize"), ("val_loss", "minimize")]
)
def test_tied_objectives_are_ranked_by_val_loss_for_the_pruner(tmp_path, tie_break, direction):
    """Two trials both at mAP 0 after an epoch: with tie_break=val_loss the one with the lower val loss reports
    the higher intermediate value (by 1e-6 x the loss); the objective itself is what the study keeps."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    from yoloscale.sweep.trial import TrialReporter, trial_link

    journal = str(tmp_path / "study.journal")
    study = optuna.create_study(
        study_name="s", storage=JournalStorage(JournalFileBackend(journal)), direction=direction
    )
    reported = []
    for loss in (2.0, 5.0):
        trial = study.ask()
        pruner = {"name": "none", "after": 1, "startup": 3}
        link = json.loads(trial_link(journal, "s", trial.number, "mAP50-95", pruner, tie_break))
        TrialReporter(link).should_stop(1, {"mAP50-95": 0.0, "box_loss": loss, "cls_loss": 1.0, "dfl_loss": 1.0})
        reported.append(study.trials[trial.number].intermediate_values[1])
        study.tell(trial, 0.0)
    if tie_break == "none" or direction == "minimize":
        assert reported == [0.0, 0.0]
    else:
        assert reported == pytest.approx([-4e-6, -7e-6]) and reported[0] > reported[1]
    assert [t.value for t in study.trials] == [0.0, 0.0]
    plain = [t.user_attrs.get("objective") for t in study.trials]  # kept beside a shifted report
    assert plain == ([None, None] if reported == [0.0, 0.0] else [0.0, 0.0])


def test_a_cuda_visible_devices_left_set_without_cuda_names_no_gpu(monkeypatch):
    import torch

    from yoloscale.sweep.scheduler import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert visible_gpus() == []
