"""Ultralytics' per-batch and per-label rules, ours beside its own code: multi_scale's random resize and cls_pw's
class weights give the same result as its DetectionTrainer on the same input."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ultralytics.models.yolo.detect import DetectionTrainer

from yoloscale.training.data import class_weights, largest_imgsz, rescale_batch


@pytest.mark.parametrize("multi_scale", [0.25, 0.5])
def test_multi_scale_resizes_as_ultralytics(multi_scale):
    theirs = SimpleNamespace(
        args=SimpleNamespace(imgsz=320, multi_scale=multi_scale), stride=32, device=torch.device("cpu")
    )
    img = torch.randint(0, 255, (2, 3, 320, 256), dtype=torch.uint8)
    sizes = set()
    for seed in range(12):
        random.seed(seed)
        expected = DetectionTrainer.preprocess_batch(theirs, {"img": img.clone()})["img"]
        random.seed(seed)
        ours = rescale_batch(img.float() / 255, 320, multi_scale, 32)
        assert ours.shape == expected.shape and torch.equal(ours, expected)
        assert ours.shape[2] % 32 == 0 and ours.shape[2] <= largest_imgsz(320, multi_scale, 32)
        sizes.add(ours.shape[2])
    assert len(sizes) > 2  # it does vary


def test_class_weights_are_ultralytics_inverse_frequency():
    labels = [{"cls": np.array([[0], [0], [1]])}, {"cls": np.array([[0]])}]  # class 0 x3, class 1 x1, class 2 none
    dataset = SimpleNamespace(labels=labels)
    for power in (0.5, 1.0):
        counts = np.array([3, 1, 0], dtype=np.float32)
        theirs = DetectionTrainer.compute_class_weights(SimpleNamespace(args=SimpleNamespace(cls_pw=power)), counts)
        expected = torch.from_numpy(theirs / theirs.mean())
        torch.testing.assert_close(class_weights(dataset, 3, power), expected)
    torch.testing.assert_close(class_weights(dataset, 3, 1.0), torch.tensor([0.5, 1.5, 1.0]))
