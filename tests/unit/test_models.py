"""Other detection families train, and what they export opens in Ultralytics."""

import pytest
import torch
import yaml

from helpers import TINY
from yoloscale.cli import main

pytestmark = pytest.mark.slow


def _custom_yaml(tmp_path):
    """A user's own YAML: YOLO11's layers with depth/width multiples of its own (no 'scales' table)."""
    from ultralytics.nn.tasks import yaml_model_load

    cfg = yaml_model_load("yolo11n.yaml")
    cfg = {k: v for k, v in cfg.items() if k not in ("scales", "scale", "yaml_file")}
    cfg.update(depth_multiple=0.33, width_multiple=0.125, nc=80)
    path = tmp_path / "my-yolo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("model", ["yolo26n.yaml", "yolov8n-p6.yaml", "custom"])
def test_family_trains_and_opens_in_ultralytics(model, tiny_data, tmp_path):
    from ultralytics import YOLO

    model = _custom_yaml(tmp_path) if model == "custom" else model
    assert (
        main(
            [
                "train",
                f"data={tiny_data}",
                *TINY,
                "imgsz=128",
                "epochs=2",
                f"model={model}",
                f"project={tmp_path}",
                "name=r",
            ]
        )
        == 0
    )
    yolo = YOLO(str(tmp_path / "r/weights/last.pt"))
    assert yolo.names == {0: "rectangle", 1: "ellipse", 2: "triangle"}
    yolo.predict(str(tiny_data.parent / "images/val/000000.png"), imgsz=128, verbose=False)


def test_yolo26_end2end_loss_is_updated_once_per_epoch(tiny_data, tmp_path):
    from yoloscale.config import load_config
    from yoloscale.trainer import Trainer

    cfg = load_config(
        None, [f"data={tiny_data}", *TINY, "epochs=3", "model=yolo26n.yaml", "val=False", f"project={tmp_path}"]
    )
    trainer = Trainer(cfg)
    assert type(trainer.criterion).__name__ == "E2ELoss" and trainer.criterion.updates == 0
    trainer.train()
    assert trainer.criterion.updates == 3
    assert trainer.criterion.o2m == pytest.approx(trainer.criterion.final_o2m)  # decayed to its final gain


def test_pretrained_means_what_it_means_in_ultralytics(trained_run):
    """pretrained=True: model=*.pt's weights; False: its architecture only; a path: that file's weights."""
    from ultralytics.nn.tasks import DetectionModel

    from yoloscale.config import load_config
    from yoloscale.errors import UserError
    from yoloscale.model import initial_weights

    pt, safetensors = trained_run / "weights/last.pt", trained_run / "weights/best.safetensors"
    key = "model.0.conv.weight"

    def fresh():
        torch.manual_seed(0)
        return DetectionModel("yolov8n.yaml", nc=3, verbose=False)

    untouched = fresh().state_dict()[key]
    model = fresh()
    assert initial_weights(model, str(pt), "", False, "False") == ""
    assert torch.equal(model.state_dict()[key], untouched)
    for pretrained, model_name in (("True", str(pt)), (str(safetensors), "yolov8n.yaml"), (str(pt), "yolov8n.yaml")):
        model = fresh()
        assert initial_weights(model, model_name, "", False, pretrained)
        assert not torch.equal(model.state_dict()[key], untouched)
    with pytest.raises(UserError, match="weights= and pretrained=False both say"):
        load_config(None, [f"weights={safetensors}", "pretrained=False"])
    assert load_config(None, ["pretrained=false"]).pretrained == "False"
