"""Knowledge distillation (distill_model=, dis=): Ultralytics' loss, and a distilled run end to end."""

import contextlib
import copy
import csv
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY
from yoloscale.errors import UserError
from yoloscale.training.distill import PROJECTOR, Distillation, read_teacher


def _teacher_pt(path, model="yolov8s.yaml", nc=5):
    """A plain Ultralytics checkpoint of another size and class count than the student."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(1)
    torch.save({"ema": DetectionModel(model, nc=nc, verbose=False).half()}, path)
    return path


def _student():
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    student = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    student.args = get_cfg(overrides={"imgsz": 64, "dis": 6.0})
    return student.train()


def _batch(n=2, size=64):
    g = torch.Generator().manual_seed(0)
    return {
        "img": torch.rand(n, 3, size, size, generator=g),
        "batch_idx": torch.arange(n).repeat_interleave(2).float(),
        "cls": torch.tensor([[0.0], [1.0], [2.0], [1.0]])[: 2 * n],
        "bboxes": torch.rand(2 * n, 4, generator=g) * 0.3 + 0.3,
    }


def test_the_distillation_loss_is_ultralytics(tmp_path):
    """Our loss beside Ultralytics' DistillationModel on the same teacher, student, projectors and batch."""
    from ultralytics.nn.distill_model import DistillationModel

    path = _teacher_pt(tmp_path / "teacher.pt")
    student = _student()
    theirs = DistillationModel(teacher_model=str(path), student_model=copy.deepcopy(student))
    ours = Distillation(read_teacher(str(path), False), student, 6.0, torch.device("cpu"), 64)
    theirs.projector.load_state_dict(getattr(student, PROJECTOR).state_dict())
    theirs.train()

    batch = _batch()
    expected, expected_items = theirs.loss(dict(batch))
    criterion = student.init_criterion()
    loss, items = criterion(student(batch["img"]), batch)
    loss, items = ours.loss(loss, items, batch["img"], contextlib.nullcontext)
    torch.testing.assert_close(loss, expected)
    assert list(items) == list(expected_items) and list(items)[-1] == "dis_loss"
    assert items["dis_loss"] > 0
    loss.sum().backward()
    assert all(p.grad is not None for p in getattr(student, PROJECTOR).parameters())
    assert all(p.grad is None for p in ours.teacher.parameters())  # the teacher stays frozen
    assert not ours.teacher_feats and not ours.student_feats  # nothing held between steps


def test_teachers_that_cannot_teach_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="must be a local Ultralytics .pt"):
        read_teacher("yolov8s.yaml", False)
    with pytest.raises(UserError, match="not found"):
        read_teacher(str(tmp_path / "missing.pt"), False)
    p6 = read_teacher(str(_teacher_pt(tmp_path / "p6.pt", "yolov8s-p6.yaml")), False)
    with pytest.raises(UserError, match="teacher's detection head reads 4 feature levels, the student's 3"):
        Distillation(p6, _student(), 6.0, torch.device("cpu"), 64)


def _rows(run):
    with open(run / "results.csv") as f:
        return list(csv.DictReader(f))


def test_a_distilled_run_trains_exports_the_plain_student_and_resumes_exactly(tiny_data, tmp_path):
    """A run with a teacher logs dis_loss as Ultralytics does, exports a student Ultralytics loads (no projector), and
    a resume from its epoch-1 checkpoint (projectors and all) ends where the uninterrupted run ended."""
    from ultralytics import YOLO

    teacher = _teacher_pt(tmp_path / "teacher.pt")
    args = [f"data={tiny_data}", *TINY, "epochs=2", "mosaic=0", f"distill_model={teacher}", "dis=2.0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the same kernels' summation order in both runs
    cmd = [sys.executable, "-m", "yoloscale", "train", *args, f"project={tmp_path}"]
    subprocess.run([*cmd, "name=straight"], env=env, check=True, capture_output=True)
    run = tmp_path / "straight"
    rows = _rows(run)
    assert {"train/dis_loss", "val/dis_loss"} <= set(rows[0]) and float(rows[0]["train/dis_loss"]) > 0
    best = YOLO(str(run / "weights" / "best.pt"))
    assert not any(PROJECTOR in k for k in best.model.state_dict())
    train_args = torch.load(run / "weights" / "best.pt", weights_only=False)["train_args"]  # as Ultralytics records
    assert train_args["distill_model"] == str(teacher) and train_args["dis"] == 2.0

    # the same run stopped after its first epoch: resumed from that checkpoint, it ends where the other ended
    first = sorted(p for p in (run / "checkpoints").iterdir() if p.name.endswith("-end"))[0]
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "run_info.json", "args.yaml"):
        (stopped / name).write_bytes((run / name).read_bytes())
    subprocess.run(["cp", "-r", str(first), str(stopped / "checkpoints")], check=True)
    subprocess.run(
        [sys.executable, "-m", "yoloscale", "train", "resume=auto", f"project={tmp_path}", "name=stopped"],
        env=env,
        check=True,
        capture_output=True,
    )
    assert [r["epoch"] for r in _rows(stopped)] == ["2"]  # it trained the second epoch only
    a = load_file(str(run / "weights" / "last.safetensors"))
    b = load_file(str(stopped / "weights" / "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
