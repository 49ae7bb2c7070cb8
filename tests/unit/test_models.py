"""Other detection families train, and what they export opens in Ultralytics."""

import copy

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
    from yoloscale.training.trainer import Trainer

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
    from yoloscale.training.pretrained import initial_weights

    pt, safetensors = trained_run / "weights/last.pt", trained_run / "weights/best.safetensors"
    key = "model.0.conv.weight"

    def fresh():
        torch.manual_seed(0)
        return DetectionModel("yolov8n.yaml", nc=3, verbose=False)

    untouched = fresh().state_dict()[key]
    model = fresh()
    assert initial_weights(model, str(pt), "", False, "False") == ("", 0)
    assert torch.equal(model.state_dict()[key], untouched)
    for pretrained, model_name in (("True", str(pt)), (str(safetensors), "yolov8n.yaml"), (str(pt), "yolov8n.yaml")):
        model = fresh()
        report, head_nc = initial_weights(model, model_name, "", False, pretrained)
        assert report and head_nc == 0
        assert not torch.equal(model.state_dict()[key], untouched)
    with pytest.raises(UserError, match="weights= and pretrained=False both say"):
        load_config(None, [f"weights={safetensors}", "pretrained=False"])
    assert load_config(None, ["pretrained=false"]).pretrained == "False"


@pytest.fixture(scope="module")
def pretrained_80(tmp_path_factory):
    """An Ultralytics .pt of 80 classes (as COCO's), two of them named like the synthetic set's."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(1)
    model = DetectionModel("yolov8n.yaml", nc=80, verbose=False)
    model.names = {i: f"class{i}" for i in range(80)}
    model.names.update({7: "triangle", 42: "Rectangle"})
    path = tmp_path_factory.mktemp("pt") / "coco80.pt"
    torch.save({"model": model, "ema": None}, path)
    return path, model.state_dict()


@pytest.mark.parametrize("cls_remap", [True, False])
def test_fine_tuning_from_other_classes_transfers_as_ultralytics(pretrained_80, cls_remap):
    """model=*.pt of 80 classes on a 3-class set: every tensor but the class outputs transfers (the class branches
    keep the pretrained width, as in Ultralytics), and cls_remap copies the rows of the classes named alike."""
    from ultralytics.nn.tasks import DetectionModel

    from yoloscale.training.pretrained import initial_weights

    path, source = pretrained_80
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.names = {0: "rectangle", 1: "ellipse", 2: "triangle"}
    theirs = copy.deepcopy(model)  # Ultralytics' own fine-tuning load, beside ours
    theirs.load(torch.load(path, weights_only=False)["model"], verbose=False)
    report, head_nc = initial_weights(model, str(path), "", False, cls_remap=cls_remap)
    if cls_remap:  # the same tensors, but the new rows (ellipse), which each draws at random
        for k, v in model.state_dict().items():
            if k.endswith(".2.weight") and ".cv3." in k:
                v, k_theirs = v[[0, 2]], theirs.state_dict()[k][[0, 2]]
            else:
                k_theirs = theirs.state_dict()[k]
            assert torch.equal(v, k_theirs), k
    assert head_nc == 80 and "80 classes, the data 3" in report
    state = model.state_dict()
    assert torch.equal(state["model.22.cv3.0.0.conv.weight"], source["model.22.cv3.0.0.conv.weight"])  # widened
    out = state["model.22.cv3.1.2.weight"]
    assert out.shape[0] == 3
    assert torch.equal(out[2], source["model.22.cv3.1.2.weight"][7]) == cls_remap  # triangle: row 7
    assert torch.equal(out[0], source["model.22.cv3.1.2.weight"][42]) == cls_remap  # Rectangle: row 42
    assert model.names == {0: "rectangle", 1: "ellipse", 2: "triangle"}


def test_a_run_fine_tuned_from_other_classes_resumes_and_exports(pretrained_80, tiny_data, tmp_path):
    """The widened class branches are rebuilt on resume and by `yoloscale export` (run_info records their width)."""
    import json

    from ultralytics import YOLO

    path, _ = pretrained_80
    args = [f"data={tiny_data}", *[a for a in TINY if not a.startswith("model=")], f"model={path}"]
    assert main(["train", *args, "epochs=1", f"project={tmp_path}", "name=ft"]) == 0
    run = tmp_path / "ft"
    assert json.loads((run / "run_info.json").read_text())["head_nc"] == 80
    assert main(["train", f"resume={run}", "epochs=2"]) == 0
    assert main(["export", str(run)]) == 0
    model = YOLO(str(run / "weights/best.pt")).model
    assert model.names == {0: "rectangle", 1: "ellipse", 2: "triangle"}
    assert model.model[-1].cv3[0][0].conv.out_channels == 80  # the pretrained width, as Ultralytics trains it
