"""A sweep whose trials are 2-process DDP runs (gloo on the CPU, torchrun): the pruner's answer reaches every rank,
so a pruned trial stops on both at the same epoch end instead of hanging one of them."""

import pytest

from helpers import TINY, run_cli

pytestmark = pytest.mark.slow


def test_ddp_trials_are_told_and_pruned_together(tiny_data, tmp_path):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    out = tmp_path / "sweep"
    out.mkdir()
    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    study = optuna.create_study(study_name="sweep", storage=storage, direction="maximize")
    study.enqueue_trial({"lr0": 0.03})
    study.enqueue_trial({"lr0": 1e-6})  # learns nothing: pruned once the first trial's mAP50 rises
    space = tmp_path / "space.yaml"
    space.write_text("lr0: {type: float, low: 0.000001, high: 0.05, log: true}\n")
    epochs = [a for a in TINY if not a.startswith("epochs=")] + ["epochs=6"]
    proc = run_cli(
        "sweep",
        str(space),
        f"data={tiny_data}",
        *epochs,
        "trials=2",
        "gpus=cpu",
        "gpus_per_trial=2",
        "objective=mAP50",
        "prune_startup=1",
        f"out={out}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = optuna.load_study(study_name="sweep", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"], proc.stdout
    for n in (0, 1):
        assert "2 process(es)" in (out / "logs" / f"trial_{n:04d}.log").read_text()
    assert (out / "trials" / "trial_0001" / "weights" / "last.pt").is_file()
