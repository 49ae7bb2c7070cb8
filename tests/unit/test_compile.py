"""compile= with compile_scope=layers: each layer compiled on its own, inside grad_ckpt, without recompiling.

On the CPU the tests compile with compile_backend=aot_eager (Dynamo's graph capture and AOTAutograd's joint graph,
without Inductor's minutes of C++ code generation), which runs the same aten ops as eager: the numbers must agree
exactly. FSDP2 and ZeRO with compiled layers: tests/distributed/test_backends.py (the `_compile` parity modes)."""

import copy

import pytest
import torch

from helpers import TINY
from yoloscale.cli import main
from yoloscale.config import load_config

pytestmark = pytest.mark.slow

NO_AUGMENTATION = ["mosaic=0", "fliplr=0", "hsv_h=0", "hsv_s=0", "hsv_v=0", "translate=0", "scale=0"]


def _three_steps(data, tmp_path, *overrides):
    from yoloscale.training.trainer import Trainer

    name = "-".join(overrides).replace("=", "")
    cfg = load_config(
        None, [f"data={data}", *TINY, *NO_AUGMENTATION, f"project={tmp_path}", f"name={name}", *overrides]
    )
    trainer = Trainer(cfg)
    trainer.model.train()
    batches = iter(trainer.train_loader)
    for _ in range(3):
        trainer.train_step(next(batches))
    return trainer


def test_compiled_layers_train_like_eager_also_inside_grad_ckpt(tiny_data, tmp_path):
    """The same losses, weights and BatchNorm statistics (updated once per step, also when a checkpointed compiled
    layer is recomputed) as eager after three steps; names unchanged; validation's copy is not compiled."""
    from yoloscale.speed.compile import is_compiled

    eager = _three_steps(tiny_data, tmp_path)
    for grad_ckpt in ("off", "all"):
        trainer = _three_steps(
            tiny_data, tmp_path, "compile=True", "compile_backend=aot_eager", f"grad_ckpt={grad_ckpt}"
        )
        layers = trainer.raw_model.model
        inner = [vars(layer)["forward"] for layer in layers]
        if grad_ckpt == "all":
            inner = [f.args[1] for f in inner]  # the checkpoint's forward: the compiled one
        assert all(is_compiled(f) for f in inner)
        assert not any("forward" in vars(layer) for layer in trainer.eval_model.model)
        assert list(trainer.epoch_losses.means().values()) == list(eager.epoch_losses.means().values())
        mine, theirs = trainer.raw_model.state_dict(), eager.raw_model.state_dict()
        assert mine.keys() == theirs.keys()
        for k, v in theirs.items():
            torch.testing.assert_close(mine[k], v, rtol=0, atol=0, msg=k)  # num_batches_tracked included
        assert "compile: 23 layers, 6 layer classes (default, aot_eager)" in trainer._describe(23)


def test_a_copy_of_a_compiled_model_runs_its_own_layers():
    """The EMA and export copy the model: a copied layer's forward must call the copy, not the original."""
    from ultralytics.nn.tasks import DetectionModel

    from yoloscale.speed.compile import compile_training_model

    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    compile_training_model(model, "default", "layers", backend="aot_eager")
    clone = copy.deepcopy(model)
    assert all(vars(c)["forward"].args[1] is c for c in clone.model)


def test_a_compiled_run_compiles_in_its_first_epoch_only(tiny_data, tmp_path, capsys):
    """Three epochs whose last batch is partial (96 images, batch 20) and validation after each: every graph is
    compiled in the first epoch (the batch dimension is dynamic; validation is not compiled)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # nothing compiled by an earlier test is reused
    before = counters["stats"]["unique_graphs"]
    args = [f"data={tiny_data}", *TINY, "epochs=3", "batch=20", "nbs=20", f"project={tmp_path}", "name=r"]
    assert main(["train", *args, "compile=default", "compile_backend=aot_eager"]) == 0
    out = capsys.readouterr()
    assert "compile: 23 layers" in out.out + out.err and "compiled again" not in out.out + out.err
    assert counters["stats"]["unique_graphs"] > before
    assert (tmp_path / "r" / "weights" / "last.pt").is_file()


def test_a_recompilation_after_the_first_epoch_is_said(monkeypatch):
    from yoloscale import compat
    from yoloscale.speed.compile import CompileWatch

    graphs = iter([21, 21, 24])
    monkeypatch.setattr(compat, "compiled_graph_count", lambda: next(graphs))
    watch = CompileWatch(enabled=True)
    assert watch.epoch_end(1) is None and watch.epoch_end(2) is None
    assert "3 graph(s) compiled again in epoch 3" in watch.epoch_end(3)
    assert CompileWatch(enabled=False).epoch_end(5) is None


@pytest.mark.parametrize(
    "bad, message",
    [
        (["compile=True", "compile_scope=model", "backend=fsdp"], "compile_scope=model is supported with backend=ddp"),
        (["compile=True", "compile_scope=model", "grad_ckpt=all"], "compile_scope=model is supported with backend=ddp"),
        (["compile=True", "grad_ckpt=all", "grad_ckpt_recompute=cheap"], "grad_ckpt_recompute=cheap is not supported"),
        (["compile=True", "backend=zero2", "offload=optimizer"], "offload=optimizer is not tested"),
        (["compile=fast"], "key 'compile' must be one of"),
    ],
)
def test_untested_combinations_are_refused(bad, message):
    from yoloscale.commands.settings import training_config
    from yoloscale.errors import UserError

    with pytest.raises(UserError, match=message):
        training_config(None, bad)


def test_ultralytics_spellings_of_compile_are_accepted():
    assert load_config(None, ["compile=True"]).compile == "default"
    assert load_config(None, ["compile=False"]).compile == "off"
    assert load_config(None, {"compile": True}).compile == "default"  # YAML's boolean
    assert load_config(None, ["compile=max-autotune-no-cudagraphs"]).compile == "max-autotune-no-cudagraphs"
