"""Ultralytics' knowledge distillation: `distill_model=teacher.pt`, `dis=` (its keys, its loss).

A frozen teacher sees each training batch; the student's neck features, through trainable 1x1 projectors, learn the
teacher's, weighted by the teacher's class scores (Ultralytics' `DistillationModel.loss`: a score-weighted L2 per
feature level, times `dis`, added to the detection loss as a fourth item, `dis_loss`).

Ultralytics wraps teacher and student in one module. Here the student stays the model every backend, checkpoint and
export knows: its feature layers get forward hooks, the projectors are a submodule of the student (trained,
checkpointed and resumed with it, left out of exported weights), and the teacher is held beside the model, never
checkpointed: a resume reloads it from `distill_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules.head import Detect

from yoloscale.errors import UserError
from yoloscale.training.model import read_ultralytics_model

PROJECTOR = "distill_projector"  # the student's submodule holding the projectors (its state keys start with it)


class Distillation:
    """The teacher, the feature hooks on both models, and the distillation loss of one micro-batch."""

    def __init__(self, teacher: nn.Module, student: nn.Module, dis: float, device: torch.device, size: int) -> None:
        self.dis, self.student = dis, student
        self.student_layers = detect_inputs(student, "the student")
        teacher_layers = detect_inputs(teacher, "the teacher (distill_model)")
        if len(teacher_layers) != len(self.student_layers):
            raise UserError(
                f"distill_model: the teacher's detection head reads {len(teacher_layers) - 1} feature levels, the "
                f"student's {len(self.student_layers) - 1}; distillation needs the same levels (e.g. both P3-P5)."
            )
        self.teacher = teacher.float().eval().requires_grad_(False)
        self.teacher_feats: dict[int, object] = {}
        self.student_feats: dict[int, object] = {}
        self._hooks = [
            model.model[i].register_forward_hook(_Capture(feats, level))
            for model, layers, feats in (
                (self.teacher, teacher_layers, self.teacher_feats),
                (student, self.student_layers, self.student_feats),
            )
            for level, i in enumerate(layers)
        ]
        # the projectors' widths: one inference-mode pass of both models (as Ultralytics sizes them)
        student_mode, here = student.training, next(student.parameters()).device
        with torch.no_grad():
            image = torch.zeros(1, student.yaml.get("channels", 3), size, size, device=here)
            self.teacher.to(here)(image)
            student.eval()(image)
        student.train(student_mode)
        levels = len(self.student_layers) - 1
        widths = [
            (_features(self.student_feats[i]).shape[1], _features(self.teacher_feats[i]).shape[1])
            for i in range(levels)
        ]
        projector = nn.ModuleList(
            nn.Sequential(nn.Conv2d(s, t, 1), nn.ReLU(inplace=True), nn.Conv2d(t, t, 1)) for s, t in widths
        )
        student.add_module(PROJECTOR, projector.to(here))
        self.teacher.to(device)
        self._clear()

    def loss(
        self, loss: torch.Tensor, items: dict[str, torch.Tensor], img: torch.Tensor, autocast: Callable
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The detection loss and its items with the distillation loss appended, after the student's forward of
        `img` (whose features the hooks hold): the teacher runs on `img` here, without gradients."""
        projector = getattr(self.student, PROJECTOR)
        try:
            with torch.no_grad(), autocast():
                self.teacher(img)
            with autocast():
                distill = self._feature_loss(projector)
        finally:
            self._clear()
        items = {**items, "dis_loss": distill.detach().reshape(())}  # a scalar, as the other items
        return torch.cat([loss, distill * img.shape[0]]), items

    def _feature_loss(self, projector: nn.ModuleList) -> torch.Tensor:
        """Ultralytics' DistillationModel.loss: per neck level, the L2 between the projected student features and
        the teacher's, weighted by the teacher's best class score at each position."""
        levels = len(self.student_layers) - 1  # the last hooked layer is the detection head
        head = self.teacher_feats[levels]
        scores = (_features(head, "one2many")["scores"] + _features(head, "one2one")["scores"]) / 2
        sizes = [self.teacher_feats[i].shape[-2] * self.teacher_feats[i].shape[-1] for i in range(levels)]
        weights = [p.sigmoid().max(dim=1, keepdim=True).values for p in torch.split(scores, sizes, dim=-1)]
        total = torch.zeros(1, device=scores.device)
        for i in range(levels):
            student = projector[i](_features(self.student_feats[i]))
            teacher = _features(self.teacher_feats[i])
            n, c = student.shape[:2]
            mse = F.mse_loss(student.view(n, c, -1), teacher.view(n, c, -1), reduction="none")
            total = total + (mse * weights[i]).sum() / (weights[i].sum() * c + 1e-9) * self.dis
        return total

    def _clear(self) -> None:
        self.teacher_feats.clear()
        self.student_feats.clear()


def read_teacher(path: str, trust_pickle: bool) -> nn.Module | None:
    """distill_model's teacher (None for ''), read as model=*.pt is: weights-only unless trust_pickle=True."""
    if not path:
        return None

    if Path(path).suffix != ".pt":
        raise UserError(f"distill_model='{path}' must be a local Ultralytics .pt (the trained teacher).")
    return read_ultralytics_model(path, trust_pickle).float()


def teacher_bytes(teacher: nn.Module | None) -> float:
    """Device memory the teacher's weights take (a batch=auto plan leaves it free)."""
    return float(sum(t.numel() * t.element_size() for t in teacher.state_dict().values())) if teacher else 0.0


class _Capture:
    """A forward hook that keeps a layer's output under its feature level."""

    def __init__(self, feats: dict, level: int) -> None:
        self.feats, self.level = feats, level

    def __call__(self, module: nn.Module, args, output) -> None:
        self.feats[self.level] = output


def detect_inputs(model: nn.Module, what: str) -> list[int]:
    """The layers a distillation reads: those feeding the detection head, then the head itself (Ultralytics' choice)."""

    for layer in model.model:
        if isinstance(layer, Detect):
            return [*layer.f, layer.i]
    raise UserError(f"distill_model: {what} has no detection head to distil from.")


def _features(output, branch: str = "one2one"):
    """A layer's output as a feature map or the head's prediction dict (Ultralytics' `decouple_outputs`)."""
    if isinstance(output, tuple):  # a head in inference mode: (decoded, raw predictions)
        output = output[1]
    if isinstance(output, dict) and branch in output:  # an end-to-end head's two branches
        output = output[branch]
    return output


def strip_projector(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A student's weights without the projectors (what Ultralytics exports of a distilled run)."""
    return {k: v for k, v in state.items() if not k.startswith(PROJECTOR + ".")}
