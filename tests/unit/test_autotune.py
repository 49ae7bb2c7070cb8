"""cudnn_benchmark=auto: cuDNN autotunes only once the run has enough training left to pay for it."""

import pytest
import torch

from helpers import TINY

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("epochs, expected", [(4, False), (4000, True)])
def test_auto_turns_autotuning_on_only_for_a_long_run(tiny_data, tmp_path, monkeypatch, epochs, expected):
    from yoloscale.config import load_config
    from yoloscale.speed import cudnn as autotune
    from yoloscale.training.trainer import Trainer

    cfg = load_config(None, [f"data={tiny_data}", *TINY, f"epochs={epochs}", "val=False", f"project={tmp_path}"])
    trainer = Trainer(cfg)
    trainer.autotune.use_cuda = True  # the decision only; the CPU ignores the flag
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(autotune, "WORTH_S", 60.0)  # a CPU micro-step is ~0.05 s
    for _ in range(4):  # 12 micro-steps an epoch: past the timed ones
        trainer.train_epoch()
        trainer.progress.epoch += 1
        trainer.progress.batch_in_epoch = 0
    assert torch.backends.cudnn.benchmark is expected
