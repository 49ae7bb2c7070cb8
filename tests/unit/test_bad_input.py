"""Bad input: a clear one-line error naming the problem, exit code 2, no traceback, nothing on disk damaged."""

import hashlib
import shutil

import pytest

from helpers import TINY, run_cli
from yoloscale.errors import UserError


def _fails(argv, message):
    proc = run_cli(*argv)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("yoloscale: error:")


def test_missing_data_yaml(tmp_path):
    _fails(["train", f"data={tmp_path}/nope.yaml", f"project={tmp_path}/runs"], "nope.yaml' not found")
    assert list((tmp_path / "runs").iterdir()) == []  # a refused run leaves no run folder behind


def test_empty_image_folder(tmp_path):
    (tmp_path / "images/train").mkdir(parents=True)
    (tmp_path / "images/val").mkdir(parents=True)
    (tmp_path / "d.yaml").write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames: [a]\n")
    _fails(["train", f"data={tmp_path}/d.yaml", *TINY, f"project={tmp_path}/runs", "name=x"], "train split")
    assert not (tmp_path / "runs" / "x").exists()


def test_unknown_model_yaml(tiny_data, tmp_path):
    _fails(
        ["train", f"data={tiny_data}", "model=yolo99z.yaml", f"project={tmp_path}"],
        "model YAML 'yolo99z.yaml' not found",
    )
    assert not (tmp_path / "train").exists()


def test_unknown_key_and_bad_value():
    _fails(["train", "epoch=3"], "unknown key 'epoch'. Did you mean 'epochs'?")
    _fails(["train", "batch=-2"], "key 'batch' must be a whole number >= 1, auto, a fraction in (0, 1) or -1")


def test_missing_config_file():
    _fails(["train", "nothere.yaml"], "config file 'nothere.yaml' not found")


def test_existing_run_directory_is_never_touched(trained_run):
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in trained_run.rglob("*") if p.is_file()}
    _fails(
        ["train", f"project={trained_run.parent}", f"name={trained_run.name}", "exist_ok=True"],
        "already exists and holds results",
    )
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in trained_run.rglob("*") if p.is_file()}
    assert before == after


def test_empty_name_picks_a_fresh_directory(tmp_path):
    from yoloscale.config import load_config
    from yoloscale.training.run_dir import new_run_dir

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.csv").write_text("x")
    assert new_run_dir(load_config(None, [f"project={tmp_path}"]))[0].name == "train2"


def test_a_taken_name_goes_to_the_next_free_one_as_in_ultralytics(tmp_path):
    from yoloscale.config import load_config
    from yoloscale.training.run_dir import new_run_dir

    for name in ("exp", "exp2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.csv").write_text("x")
    run, lock = new_run_dir(load_config(None, [f"project={tmp_path}", "name=exp"]))
    assert run.name == "exp3" and (tmp_path / "exp" / "results.csv").read_text() == "x"
    lock.release()
    # exist_ok: that folder itself, empty or not yet there; one holding results is refused, not overwritten
    run, lock = new_run_dir(load_config(None, [f"project={tmp_path}", "name=fresh", "exist_ok=True"]))
    assert run == tmp_path / "fresh"
    lock.release()
    with pytest.raises(UserError, match="holds results; it is never overwritten"):
        new_run_dir(load_config(None, [f"project={tmp_path}", "name=exp", "exist_ok=True"]))


def test_bad_labels_are_skipped_and_counted(tiny_data, tmp_path):
    """Malformed label lines and class ids >= nc: Ultralytics skips those images and reports the count."""
    from yoloscale.config import load_config
    from yoloscale.training.data import build_dataset, check_dataset, ultralytics_args

    root = tmp_path / "shapes"
    shutil.copytree(tiny_data.parent, root, ignore=shutil.ignore_patterns("*.cache"))
    (root / "data.yaml").write_text((root / "data.yaml").read_text().replace(str(tiny_data.parent), str(root)))
    (root / "labels/train/000000.txt").write_text("0 0.5 0.5\n")  # too few columns
    (root / "labels/train/000001.txt").write_text("zero 0.5 0.5 0.1 0.1\n")  # not a number
    (root / "labels/train/000002.txt").write_text("7 0.5 0.5 0.1 0.1\n")  # class id >= nc (3)
    data = check_dataset(root / "data.yaml")
    args = ultralytics_args(load_config(None, TINY), root / "data.yaml")
    dataset = build_dataset(args, data, "train", 8, 32)
    assert len(dataset) == 96 - 3
    assert not any(f.endswith(("000000.png", "000001.png", "000002.png")) for f in dataset.im_files)
    cache = __import__("ultralytics.data.utils", fromlist=["load_dataset_cache_file"]).load_dataset_cache_file(
        root / "labels/train.cache"
    )
    assert cache["results"][3] == 3  # Ultralytics' corrupt-image count, which it prints


@pytest.mark.parametrize("argv, message", [(["export", "/nonexistent"], "not a yoloscale run directory")])
def test_export_of_a_non_run(argv, message):
    _fails(argv, message)


def test_an_empty_image_file_is_named_plainly(tiny_data, tmp_path):
    """Ultralytics reports a zero-byte image as a missing `pi_heif` module; one more line says what it is."""
    from yoloscale.config import load_config
    from yoloscale.training.data import build_dataset, check_dataset, ultralytics_args

    root = tmp_path / "shapes"
    shutil.copytree(tiny_data.parent, root, ignore=shutil.ignore_patterns("*.cache"))
    (root / "data.yaml").write_text((root / "data.yaml").read_text().replace(str(tiny_data.parent), str(root)))
    (root / "images/train/000003.png").write_bytes(b"")
    data = check_dataset(root / "data.yaml")
    args = ultralytics_args(load_config(None, TINY), root / "data.yaml")
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        build_dataset(args, data, "train", 8, 32)
    assert "000003.png' was skipped: not an image it can decode" in err.getvalue()


@pytest.mark.parametrize("arg", ["lr0=1000", "lrf=5", "momentum=1.5", "mosaic=2", "hsv_h=-1"])
def test_a_value_out_of_ultralytics_range_is_one_line(arg):
    _fails(["train", arg], f"key '{arg.split('=')[0]}' must be between 0 and 1")


def test_every_ultralytics_fraction_key_we_have_is_range_checked():
    from ultralytics.cfg import CFG_FRACTION_KEYS

    from yoloscale.config import FIELDS, FRACTION_KEYS

    assert set(CFG_FRACTION_KEYS) & set(FIELDS) <= set(FRACTION_KEYS)


def test_deepspeed_flag_among_key_values_is_taken():
    from yoloscale.cli import _options_first, _parser

    ns = _parser().parse_args(_options_first(["train", "epochs=1", "--deepspeed", "x.json", "imgsz=64"]))
    assert ns.deepspeed == "x.json" and ns.args == ["epochs=1", "imgsz=64"]
    _fails(["train", "epochs=1", "--deepspeed", "/nonexistent/ds.json", "imgsz=64"], "ds.json' not found")


def test_a_full_disk_while_writing_an_ultralytics_pt_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from ultralytics.nn.tasks import DetectionModel

    from yoloscale.training import export

    def full(obj, f):
        open(f, "wb").write(b"partial")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: No space left on device"
        )

    monkeypatch.setattr(export.torch, "save", full)
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    with pytest.raises(UserError, match="no space left on the device writing .*last.pt'") as e:
        export.write_ultralytics_pt(model, SimpleNamespace(), tmp_path / "last.pt")
    assert "last complete checkpoint" not in str(e.value)  # no checkpoint is named that does not exist
    assert list(tmp_path.iterdir()) == []


def test_an_undecodable_image_installs_nothing(tiny_data, tmp_path):
    """Ultralytics would try `pip install pi-heif` for an image Pillow cannot identify; we never install."""
    import os
    import subprocess
    import sys

    root = tmp_path / "shapes"
    shutil.copytree(tiny_data.parent, root, ignore=shutil.ignore_patterns("*.cache"))
    (root / "data.yaml").write_text((root / "data.yaml").read_text().replace(str(tiny_data.parent), str(root)))
    (root / "images/train/000003.png").write_bytes(b"not an image at all")
    env = {k: v for k, v in os.environ.items() if k != "YOLO_AUTOINSTALL"}
    argv = ["train", f"data={root / 'data.yaml'}", *TINY, "epochs=1", "val=False", f"project={tmp_path}", "name=r"]
    proc = subprocess.run([sys.executable, "-m", "yoloscale", *argv], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "attempting AutoUpdate" not in proc.stdout + proc.stderr
    assert "000003.png' was skipped" in proc.stderr


def test_errors_carry_no_terminal_colour_codes(capsys, tmp_path):
    """Ultralytics colours its messages; quoted inside our one-line error they must come out plain."""
    from yoloscale.cli import main
    from yoloscale.errors import plain

    assert plain("\x1b[34m\x1b[1mtrain: \x1b[0mno images") == "train: no images"
    assert main(["train", "data=/nonexistent/\x1b[31mred\x1b[0m.yaml", f"project={tmp_path}"]) == 2
    assert "\x1b[" not in capsys.readouterr().err
