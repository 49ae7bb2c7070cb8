import re

import pytest
import yaml

from yoloscale.config import TrainConfig, field_help, load_config
from yoloscale.errors import UserError


def test_defaults_are_the_synthetic_quick_start():
    cfg = load_config()
    assert cfg.data == "synthetic" and cfg.model.endswith(".yaml") and cfg.epochs > 0


def test_overrides_are_typed():
    cfg = load_config(None, ["imgsz=640", "batch=64", "precision=bf16", "cos_lr=true", "lr0=1e-3", "name=exp"])
    assert (cfg.imgsz, cfg.batch, cfg.precision, cfg.cos_lr, cfg.lr0, cfg.name) == (640, 64, "bf16", True, 1e-3, "exp")
    assert isinstance(load_config(None, ["lr0=1"]).lr0, float)  # an int is a fine float


def test_file_then_overrides(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("imgsz: 320\nepochs: 3\n")
    cfg = load_config(f, ["epochs=5"])
    assert (cfg.imgsz, cfg.epochs) == (320, 5)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(UserError, match="unknown key 'imgz'.*Did you mean 'imgsz'"):
        load_config(None, ["imgz=640"])


def test_unknown_key_in_file_names_the_file(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(UserError, match=r"cfg.yaml.*unknown key 'learning_rate'"):
        load_config(f)


@pytest.mark.parametrize(
    "arg, message",
    [
        ("batch=big", "key 'batch' expects a number or 'auto'"),
        ("cos_lr=maybe", "key 'cos_lr' expects bool"),
        ("precision=bf61", "must be one of.*Did you mean 'bf16'"),
        ("optimizer=adamx", "must be one of.*Did you mean 'Adam"),
        ("imgsz=100", "multiple of 32"),
        ("epochs=0", "'epochs' must be > 0"),
        ("imgsz", "not key=value"),
    ],
)
def test_bad_values_are_rejected(arg, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [arg])


def test_bad_yaml_names_the_line(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("epochs: 3\nimgsz: [640\n")
    with pytest.raises(UserError, match=r"cfg.yaml' line \d+: not valid YAML"):
        load_config(f)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["imgsz=320", "name=x", "optimizer=AdamW", "cache=ram"])
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["imgsz"] == 320


def test_every_field_is_documented():
    rows = field_help()
    assert len(rows) == len(TrainConfig.__dataclass_fields__)
    assert all(len(doc) > 10 for _, _, doc in rows)


def test_a_retired_key_loads_with_the_value_that_trains_as_now_and_is_refused_otherwise(tmp_path):
    """A config.yaml of an earlier run still resumes; asking for what no longer exists is one clear line."""
    old = tmp_path / "config.yaml"
    old.write_text("epochs: 3\nfused_bn_silu: false\n")
    assert load_config(old).epochs == 3
    old.write_text("epochs: 3\nfused_bn_silu: true\n")
    with pytest.raises(UserError, match=r"config.yaml': key 'fused_bn_silu' was removed \(.*slower than eager"):
        load_config(old)
    with pytest.raises(UserError, match="command line: key 'fused_bn_silu' was removed"):
        load_config(None, ["fused_bn_silu=True"])


def test_every_key_of_ultralytics_default_yaml_has_an_answer():
    """Each key of the pinned Ultralytics' cfg/default.yaml is ours with its meaning, spelled otherwise here, one that
    training does not use, or one not supported yet, never an unexplained 'unknown key'."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    from yoloscale.config import FIELDS, NOT_FOR_TRAINING, ULTRALYTICS_FORMS, ULTRALYTICS_SPELLINGS

    accepted = set(FIELDS) | set(ULTRALYTICS_FORMS) | {"task"}
    known = accepted | set(NOT_FOR_TRAINING) | set(ULTRALYTICS_SPELLINGS)
    assert sorted(set(DEFAULT_CFG_DICT) - known) == []
    for key in DEFAULT_CFG_DICT:
        if key not in accepted:
            with pytest.raises(UserError) as e:
                load_config(None, [f"{key}=1"])
            assert "unknown key" not in str(e.value) and f"Ultralytics' key '{key}'" in str(e.value)


def test_a_config_file_with_ultralytics_non_training_keys_loads_with_one_note(tmp_path, capsys):
    cfg = tmp_path / "args.yaml"
    cfg.write_text("task: detect\nmode: train\nepochs: 3\nconf: null\niou: 0.7\nformat: torchscript\nproject: null\n")
    loaded = load_config(cfg)
    assert loaded.epochs == 3 and loaded.project == "runs"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "4 of Ultralytics' keys that training does not use are ignored" in err
    cfg.write_text("task: segment\n")
    with pytest.raises(UserError, match="yoloscale trains detectors"):
        load_config(cfg)


@pytest.mark.parametrize(
    "arg, says",
    [
        ("lr=0.1", "Did you mean 'lr0'"),
        ("conf=0.3", "predict and val settings: training does not use it"),
        ("format=onnx", "yoloscale export RUN format="),
        ("distill_model=teacher.pt backend=fsdp", "distill_model= trains with backend=ddp"),
        ("distill_model=teacher.pt compile=True", "distill_model= runs eagerly"),
    ],
)
def test_an_ultralytics_key_on_the_command_line_says_what_it_is_here(arg, says):
    from yoloscale.commands.settings import training_config

    with pytest.raises(UserError, match=re.escape(says)):
        training_config(None, arg.split())


@pytest.mark.parametrize(
    "args, precision",
    [(["amp=True"], "auto"), (["amp=False"], "fp32"), (["amp=bf16"], "bf16"), (["amp=True", "precision=fp16"], "fp16")],
)
def test_ultralytics_amp_sets_the_precision(args, precision):
    assert load_config(None, args).precision == precision


def test_amp_and_precision_that_disagree_are_one_line(tmp_path):
    with pytest.raises(UserError, match="amp=False and precision=bf16 disagree"):
        load_config(None, ["amp=False", "precision=bf16"])
    (tmp_path / "args.yaml").write_text("amp: false\nprecision: fp16\n")
    with pytest.raises(UserError, match="config file .*args.yaml.*disagree"):
        load_config(tmp_path / "args.yaml")
    (tmp_path / "args.yaml").write_text("amp: false\n")  # the file's amp, the command line's precision: it wins
    assert load_config(tmp_path / "args.yaml", ["precision=bf16"]).precision == "bf16"


@pytest.mark.parametrize(
    "value, parsed",
    [
        ("", ""),
        ("cpu", "cpu"),
        ("0", ["0"]),
        ("cuda:1", ["1"]),
        ("0,1,2", ["0", "1", "2"]),
        ("[0, 1]", ["0", "1"]),
        ("-1", ["-1"]),
        ("-1,-1", ["-1", "-1"]),
    ],
)
def test_ultralytics_device_forms(value, parsed):
    from yoloscale.distributed.devices import parse_device

    assert parse_device(value) == parsed


@pytest.mark.parametrize("value", ["mps", "npu:0", "0,0", "1,-1", "gpu"])
def test_a_device_we_cannot_train_on_is_one_line(value):
    with pytest.raises(UserError, match="device"):
        load_config(None, [f"device={value}"])


def test_device_cpu_is_cpu_true_and_a_list_from_yaml_is_accepted(tmp_path):
    assert load_config(None, ["device=cpu"]).cpu
    (tmp_path / "args.yaml").write_text("device: [0, 1]\n")
    assert load_config(tmp_path / "args.yaml").device == "0,1"
    with pytest.raises(UserError, match="cpu=True and device=0 disagree"):
        load_config(None, ["cpu=True", "device=0"])


def test_ultralytics_distillation_keys_load_from_its_args_yaml(tmp_path):
    (tmp_path / "args.yaml").write_text("distill_model: null\ndis: 6.0\nsave_dir: runs/detect/train\n")
    cfg = load_config(tmp_path / "args.yaml")
    assert cfg.distill_model == "" and cfg.dis == 6.0
    (tmp_path / "args.yaml").write_text("distill_model: teacher.pt\ndis: 2.5\n")
    cfg = load_config(tmp_path / "args.yaml")
    assert cfg.distill_model == "teacher.pt" and cfg.dis == 2.5
    with pytest.raises(UserError, match="key 'dis' must be >= 0"):
        load_config(None, ["dis=-1"])
