"""Nothing runs that the user did not trust: a payload planted in each file we read (model=, weights=, resume,
export; Ultralytics' model YAML inside a .pt, DeepSpeed's and DCP's pickles) is refused with one line and never runs,
unless trust_pickle=True. Each payload would create a marker file; every test asserts it does not exist."""

import json
import os
import shutil

import pytest
import torch

from helpers import TINY, run_cli
from yoloscale.checkpoint import complete_checkpoints, folder
from yoloscale.checkpoint.trusted import check_folder, problem_with
from yoloscale.errors import UserError

pytestmark = pytest.mark.slow


class Payload:
    """Unpickling this runs a shell command (as a crafted file would)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _activation(marker) -> str:
    return f"(__import__('pathlib').Path('{marker}').touch(), nn.SiLU())[1]"


def _ultralytics_pt(path, marker):
    """A plain Ultralytics checkpoint (it passes a weights-only load) whose stored YAML Ultralytics would evaluate."""
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.yaml["activation"] = _activation(marker)
    torch.save({"ema": model.half()}, path)
    return path


def _refused(proc, marker, words: str = "trust_pickle=True"):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and words in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("yoloscale: error:")
    assert not os.path.exists(marker), "the payload ran"


def test_a_pt_whose_yaml_would_run_code_is_refused_as_model(tiny_data, tmp_path):
    marker = tmp_path / "PWNED"
    pt = _ultralytics_pt(tmp_path / "e.pt", marker)
    proc = run_cli("train", f"data={tiny_data}", *TINY, f"model={pt}", f"project={tmp_path}", "name=a")
    _refused(proc, marker, "activation")


def test_weights_from_such_a_pt_are_read_as_tensors_only(tiny_data, tmp_path):
    marker = tmp_path / "PWNED"
    pt = _ultralytics_pt(tmp_path / "e.pt", marker)
    base = [f"data={tiny_data}", *TINY, "epochs=1", "val=False", f"project={tmp_path}"]
    proc = run_cli("train", *base, "name=a", f"weights={pt}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tensors loaded" in proc.stdout + proc.stderr and not marker.exists()
    torch.save({"model": Payload(marker)}, tmp_path / "evil.pt")
    _refused(run_cli("train", *base, "name=b", f"weights={tmp_path / 'evil.pt'}"), marker)


def test_a_model_yaml_naming_a_function_or_code_is_refused():
    from yoloscale.training.model import check_architecture

    base = {"nc": 3, "backbone": [[-1, 1, "Conv", [16, 3, 2]]], "head": [[-1, 1, "Detect", ["nc"]]]}
    check_architecture(base, "ok")
    check_architecture({**base, "activation": "nn.LeakyReLU(0.1)"}, "ok")
    check_architecture({**base, "activation": "torch.nn.SiLU(inplace=True)"}, "ok")
    for bad in ("nn.SiLU(__import__('os'))", "eval('1')", "nn.functional.silu", "torch.nn.Module.__subclasses__()"):
        with pytest.raises(UserError, match="activation"):
            check_architecture({**base, "activation": bad}, "x")
    for module in ("torch_safe_load", "attempt_load_one_weight", "yaml_model_load", "__builtins__", "nn.init"):
        with pytest.raises(UserError, match="not a model layer class"):
            check_architecture({**base, "backbone": [[-1, 1, module, ["x.pt"]]]}, "x")


def _copy_run(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns(".lock"))
    return run


def _reseal(ckpt):
    (ckpt / folder.MANIFEST).unlink()
    (ckpt / folder.MARKER).unlink()
    folder.seal(ckpt)


def test_resume_refuses_a_checkpoint_holding_a_pickle_payload(trained_run, tmp_path):
    marker = tmp_path / "PWNED"
    run = _copy_run(trained_run, tmp_path)
    ckpt = complete_checkpoints(run)[-1]
    torch.save({"state": Payload(marker)}, ckpt / "random_states_0.pkl")
    _reseal(ckpt)  # the manifest matches: only the content is hostile
    _refused(run_cli("train", f"resume={run}"), marker, "random_states_0.pkl")


def _crafted_sharded_checkpoint(trained_run, tmp_path, backend: str):
    """A run folder whose newest checkpoint says `backend`, has no EMA file, and holds a planted pickle where that
    backend's weights are read from (DeepSpeed: torch.load in full; DCP: pickle.load of .metadata)."""
    marker = tmp_path / "PWNED"
    run = _copy_run(trained_run, tmp_path)
    for old in complete_checkpoints(run)[:-1]:
        shutil.rmtree(old)
    ckpt = complete_checkpoints(run)[-1]
    (ckpt / "ema.safetensors").unlink()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["progress"]["backend"] = backend
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    if backend == "zero2":
        (ckpt / "pytorch_model").mkdir()
        torch.save({"module": Payload(marker)}, ckpt / "pytorch_model" / "mp_rank_00_model_states.pt")
    else:
        (ckpt / "pytorch_model_fsdp_0").mkdir()
        with open(ckpt / "pytorch_model_fsdp_0" / ".metadata", "wb") as f:
            import pickle

            pickle.dump(Payload(marker), f)
    _reseal(ckpt)
    return run, marker


@pytest.mark.parametrize("backend", ["zero2", "fsdp"])
def test_export_refuses_a_crafted_sharded_checkpoint(trained_run, tmp_path, backend):
    run, marker = _crafted_sharded_checkpoint(trained_run, tmp_path, backend)
    _refused(run_cli("export", str(run)), marker, "reading it could run code")


def test_export_refuses_a_run_whose_recorded_architecture_would_run_code(trained_run, tmp_path):
    from ultralytics.nn.tasks import yaml_model_load

    marker = tmp_path / "PWNED"
    run = _copy_run(trained_run, tmp_path)
    info = json.loads((run / "run_info.json").read_text())
    info["model"] = {**yaml_model_load("yolov8n.yaml"), "activation": _activation(marker)}
    (run / "run_info.json").write_text(json.dumps(info))
    _refused(run_cli("export", str(run)), marker, "activation")


def test_the_check_passes_what_our_backends_write_and_names_what_it_refuses(tmp_path):
    """Every layout's real files pass (tests/distributed/test_full_state.py writes them all and loads them through
    this check); here: a DCP metadata pickle, a torch.save file and a legacy pickle, each with a payload."""
    import pickle

    marker = tmp_path / "PWNED"
    torch.save({"w": torch.zeros(2), "x": Payload(marker)}, tmp_path / "a.pt")
    assert "posix.system" in problem_with(tmp_path / "a.pt")
    with open(tmp_path / ".metadata", "wb") as f:
        pickle.dump({"m": Payload(marker)}, f)
    assert "posix.system" in problem_with(tmp_path / ".metadata")
    torch.save({"w": torch.zeros(2)}, tmp_path / "ok.pt")
    assert problem_with(tmp_path / "ok.pt") is None
    with pytest.raises(UserError, match="trust_pickle=True"):
        check_folder(tmp_path)
    check_folder(tmp_path, trust_pickle=True)  # the user's word: nothing is checked
    assert not marker.exists()
