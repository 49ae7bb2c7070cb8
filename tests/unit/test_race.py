"""`yoloscale race`: Ultralytics' trainer and ours on the same data, timed and compared."""

import dataclasses
import json

import pytest

from helpers import run_cli


def test_race_and_bench_default_to_the_cpu_where_there_is_no_gpu():
    import torch

    from yoloscale.commands.bench import _default_precisions
    from yoloscale.commands.race import split_args

    cuda = torch.cuda.is_available()
    assert split_args([])[2]["gpus"] == (1 if cuda else 0)
    assert split_args(["gpus=0"])[2]["gpus"] == 0
    assert _default_precisions() == ("bf16,fp16" if cuda else "fp32")


def test_our_side_trains_the_synthetic_set_at_the_settings_it_implies():
    """data=synthetic brings imgsz=160 and epochs=10 with it; our side gets a data.yaml path, so they are passed
    along, or it would train at 640 px against Ultralytics' 160 (unless given)."""
    from yoloscale.commands.race import with_synthetic_defaults
    from yoloscale.config import load_config

    cfg = dataclasses.replace(load_config(None, ["epochs=2"]), data="/x/data.yaml")
    assert with_synthetic_defaults(cfg, ["epochs=2"]) == ["epochs=2", "data=/x/data.yaml", "imgsz=160"]
    assert load_config(None, with_synthetic_defaults(cfg, ["epochs=2"])).imgsz == 160


@pytest.mark.slow
def test_race_on_the_cpu_reports_both_sides(tiny_data, tmp_path):
    out = tmp_path / "race"
    proc = run_cli(
        "race",
        f"data={tiny_data}",
        "model=yolov8n.yaml",
        "imgsz=64",
        "epochs=2",
        "batch=16",
        "workers=0",
        "gpus=0",
        f"out={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "yoloscale / ultralytics wall-clock" in proc.stdout
    summary = json.loads((out / "race.json").read_text())
    for name in ("ultralytics", "yoloscale"):
        side = summary["sides"][name]
        assert [e["epoch"] for e in side["epochs"]] == [1, 2], name
        assert 0 < side["first_step_s"] < side["epochs"][0]["time_s"] < side["epochs"][1]["time_s"] < side["wall_s"]
        assert all(e["img_s"] > 0 and 0 <= e["map50_95"] <= 1 for e in side["epochs"])
    assert (out / "race.png").stat().st_size > 1000
    # what a user of Ultralytics finds in a run folder, ours beside its own (race runs it with plots=False)
    theirs, ours = out / "ultralytics", out / "yoloscale"
    for name in ("args.yaml", "results.csv", "weights/best.pt", "weights/last.pt"):
        assert (theirs / name).is_file() and (ours / name).is_file(), name
    header = (theirs / "results.csv").read_text().splitlines()[0].split(",")
    assert (ours / "results.csv").read_text().splitlines()[0].split(",")[: len(header)] == header
    again = run_cli("race", f"data={tiny_data}", "gpus=0", f"out={out}")
    assert again.returncode == 2 and "never overwritten" in again.stderr


def test_race_settings_reach_ultralytics_under_its_names():
    from yoloscale.commands.race import split_args, ultralytics_settings
    from yoloscale.config import load_config

    cfg_file, given, race = split_args(
        ["model=yolo11x.yaml", "precision=bf16", "lr0=0.02", "grad_ckpt=highres", "gpus=2", "out=x"]
    )
    assert (cfg_file, race["gpus"], race["out"], race["sides"]) == (None, 2, "x", ["ultralytics", "yoloscale"])
    settings = ultralytics_settings(load_config(None, given), given, gpus=2)
    assert settings["amp"] == "bf16" and settings["lr0"] == 0.02 and settings["device"] == "0,1"
    assert "grad_ckpt" not in settings and settings["model"] == "yolo11x.yaml"
    with pytest.raises(Exception, match="sides"):
        split_args(["sides=theirs"])


@pytest.mark.slow
def test_a_panel_races_each_case_per_seed_on_the_hard_set(tmp_path):
    panel = tmp_path / "panel.yaml"
    panel.write_text(
        "data: synthetic-hard\nimages: 16\ncommon: {epochs: 1, batch: 8, workers: 0}\n"
        "cases:\n  - {name: n64, model: yolov8n.yaml, imgsz: 64}\n"
    )
    out = tmp_path / "p"
    proc = run_cli("race", f"panel={panel}", "repeats=2", "gpus=0", "close_mosaic=0", f"out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "panel.json").read_text())
    case = summary["cases"]["n64"]
    assert len(case["wall_ratio"]) == 2 and all(r > 0 for r in case["wall_ratio"])
    assert len(case["map_gap_by_epoch"]) == 1
    for seed in (0, 1):
        race = json.loads((out / f"n64-{seed}" / "race.json").read_text())
        assert race["config"]["seed"] == seed and race["config"]["close_mosaic"] == 0  # the command line's keys apply
        assert race["config"]["data"] == str(out / "data" / "data.yaml")
    names = __import__("yaml").safe_load((out / "data" / "data.yaml").read_text())["names"]
    assert len(names) == 10  # the hard set's classes
    assert "wall ratio" in proc.stdout


def test_a_bad_panel_is_one_line(tmp_path):
    (tmp_path / "p.yaml").write_text("cases: [{model: yolov8n.yaml}]\n")
    proc = run_cli("race", f"panel={tmp_path / 'p.yaml'}", f"out={tmp_path / 'o'}")
    assert proc.returncode == 2 and "each with a 'name'" in proc.stderr and "Traceback" not in proc.stderr
