"""Ultralytics' own trainer beside ours on the CPU: the same optimizer, the same per-batch lr / momentum / beta1 of
every parameter group, the same accumulate, the same optimizer steps. When Ultralytics changes its trainer, this
fails: optim.py is then out of date."""

import pytest

pytestmark = pytest.mark.slow


class _Enough(Exception):
    """Raised from the recorder once enough batches are recorded (a long run, stopped early)."""


def _groups(optimizer) -> list[tuple]:
    """(group name, lr, momentum or beta1) of every non-empty group, in order."""
    return [
        (g.get("param_group"), g["lr"], g["momentum"] if "momentum" in g else g["betas"][0])
        for g in optimizer.param_groups
        if g["params"]
    ]


def _count_steps(optimizer) -> None:
    """Count the optimizer's steps (on the instance, whatever its class)."""
    step, optimizer.steps_taken = optimizer.step, 0

    def counted(*args, **kwargs):
        optimizer.steps_taken += 1
        return step(*args, **kwargs)

    optimizer.step = counted


def _ultralytics(data, project, settings: dict, batches: int) -> list[dict]:
    from ultralytics import YOLO

    records = []

    def record(trainer):
        records.append(
            {
                "optimizer": type(trainer.optimizer).__name__,
                "groups": _groups(trainer.optimizer),
                "accumulate": trainer.accumulate,
                "steps": trainer.optimizer.steps_taken,
            }
        )
        if len(records) == batches:
            raise _Enough

    model = YOLO(settings["model"])
    model.add_callback("on_pretrain_routine_end", lambda trainer: _count_steps(trainer.optimizer))
    model.add_callback("on_train_batch_end", record)
    keys = {k: v for k, v in settings.items() if k != "model"}
    try:
        model.train(
            data=str(data),
            device="cpu",
            workers=0,
            amp=False,
            val=False,
            plots=False,
            project=str(project),
            name="ultralytics",
            exist_ok=True,
            verbose=False,
            **keys,
        )
    except _Enough:
        pass
    return records


def _ours(data, project, settings: dict, batches: int) -> list[dict]:
    from yoloscale.config import load_config
    from yoloscale.training.trainer import Trainer

    overrides = [f"{k}={v}" for k, v in settings.items()]
    # every other key at its default: the defaults are Ultralytics' own
    cfg = load_config(
        None, [f"data={data}", "workers=0", "plots=False", "val=False", *overrides, f"project={project}", "name=ours"]
    )
    trainer = Trainer(cfg)
    _count_steps(trainer.optimizer.optimizer)
    records, step = [], trainer.train_step

    def recorded_step(batch):
        ni = trainer.progress.micro_step
        stepped = step(batch)
        records.append(
            {
                "optimizer": type(trainer.optimizer.optimizer).__name__,
                "groups": _groups(trainer.optimizer),
                "accumulate": trainer.schedule.accumulate_at(ni),
                "steps": trainer.optimizer.optimizer.steps_taken,
            }
        )
        if len(records) == batches:
            raise _Enough
        return stepped

    trainer.train_step = recorded_step
    try:
        trainer.train()
    except _Enough:
        pass
    return records


RUNS = {
    # optimizer=auto on a short run: AdamW, lr0 from the class count, warmup_bias_lr 0; no accumulation
    "auto-adamw": ({"model": "yolov8n.yaml", "imgsz": 64, "batch": 32, "nbs": 32, "epochs": 3, "close_mosaic": 0}, 9),
    # optimizer=auto on a run of > 10,000 iterations: MuSGD (Muon groups, 3 x lr on the class head), accumulate 4
    # ramping up during warmup; stopped after warmup
    "auto-musgd": ({"model": "yolov8n.yaml", "imgsz": 64, "batch": 16, "epochs": 6000, "close_mosaic": 0}, 22),
    # an explicit SGD with accumulation 8, cosine decay, momentum warmup
    "sgd-accumulate": (
        {
            "model": "yolov8n.yaml",
            "imgsz": 64,
            "batch": 8,
            "epochs": 4,
            "warmup_epochs": 2,
            "optimizer": "SGD",
            "lr0": 0.02,
            "cos_lr": True,
            "close_mosaic": 0,
        },
        48,
    ),
}


@pytest.mark.parametrize("run", RUNS)
def test_schedule_matches_ultralytics_trainer(run, tiny_data, tmp_path):
    settings, batches = RUNS[run]
    theirs = _ultralytics(tiny_data, tmp_path, settings, batches)
    ours = _ours(tiny_data, tmp_path, settings, batches)
    assert len(theirs) == len(ours) == batches
    for i, (t, o) in enumerate(zip(theirs, ours)):
        assert o["optimizer"] == t["optimizer"], i
        assert o["accumulate"] == t["accumulate"], (i, o, t)
        assert o["steps"] == t["steps"], (i, o, t)
        assert [g[0] for g in o["groups"]] == [g[0] for g in t["groups"]], i
        flat = lambda r: [v for g in r["groups"] for v in g[1:]]  # noqa: E731
        assert flat(o) == pytest.approx(flat(t), rel=1e-9, abs=1e-12), (i, o, t)
    if run == "auto-musgd":
        assert theirs[0]["optimizer"] == "MuSGD" and {g[0] for g in theirs[0]["groups"]} >= {"muon", "bias", "bn"}


def test_weight_decay_and_groups_match_ultralytics(tiny_data, tmp_path):
    """Ultralytics scales weight decay by batch x accumulate / nbs and splits the groups the same way (parameter
    identity, decay, and MuSGD's 3 x lr head groups)."""
    from types import SimpleNamespace

    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.nn.tasks import DetectionModel

    from yoloscale.training.optim import OptimizerChoice, build_optimizer

    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    for name in ("SGD", "AdamW", "MuSGD"):
        stub = SimpleNamespace(args=SimpleNamespace(), data={"nc": 3})
        theirs = BaseTrainer.build_optimizer(stub, model, name=name, lr=0.01, momentum=0.9, decay=1e-3)
        ours = build_optimizer(model, OptimizerChoice(name, 0.01, 0.9, 0.0), weight_decay=1e-3)
        assert type(ours).__name__ == type(theirs).__name__
        assert len(ours.param_groups) == len(theirs.param_groups)
        for a, b in zip(ours.param_groups, theirs.param_groups):
            assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
            for key in ("lr", "weight_decay", "param_group", "use_muon", "momentum", "betas", "nesterov"):
                assert a.get(key) == b.get(key), (name, key)


def test_a_run_folder_holds_what_ultralytics_writes(tiny_data, tmp_path):
    """The same tiny run by Ultralytics' trainer and ours: every file name it writes (plots, args.yaml, results.csv,
    weights), and results.csv with its columns first, in its order."""
    import csv

    from ultralytics import YOLO

    from yoloscale.cli import main
    from yoloscale.config import load_config

    settings = {"epochs": 2, "imgsz": 64, "batch": 8, "workers": 0, "close_mosaic": 1}
    YOLO("yolov8n.yaml").train(
        data=str(tiny_data), device="cpu", amp=False, project=str(tmp_path), name="ul", verbose=False, **settings
    )
    ours = ["train", f"data={tiny_data}", "model=yolov8n.yaml", f"project={tmp_path}", "name=ours"]
    assert main([*ours, *(f"{k}={v}" for k, v in settings.items())]) == 0

    def files(run):
        return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}

    missing = files(tmp_path / "ul") - files(tmp_path / "ours")
    assert not missing, missing

    def header(run):
        with open(run / "results.csv") as f:
            return next(csv.reader(f))

    theirs = header(tmp_path / "ul")
    assert header(tmp_path / "ours")[: len(theirs)] == theirs
    # its args.yaml is a config file of ours: the same settings, into the next free name (ul2), as it would
    assert main(["train", str(tmp_path / "ul" / "args.yaml"), "epochs=1"]) == 0
    again = load_config(tmp_path / "ul2" / "config.yaml")
    assert (again.imgsz, again.batch, again.close_mosaic, again.device, again.data) == (64, 8, 1, "cpu", str(tiny_data))
