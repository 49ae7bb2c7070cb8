"""`yoloscale sweep` end to end on the CPU: tiny trials, two at once, pruned, failing, killed and continued."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from helpers import TINY, run_cli

pytestmark = pytest.mark.slow

SIX_EPOCHS = [a for a in TINY if not a.startswith("epochs=")] + ["epochs=6", "optimizer=SGD"]


def _study(out):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    return optuna.create_study(study_name=out.name, storage=storage, direction="maximize", load_if_exists=True)


def test_four_trials_two_at_once_one_pruned_one_failed(tiny_data, tmp_path):
    """Queued first (an ordinary Optuna study: enqueue_trial works on it): two good learning rates, one so small that
    nothing is learnt (its mAP50 stays 0 while the others' rises: the median pruner stops it), and a model file that
    does not exist (the trial fails with its one-line error; the sweep goes on)."""
    out = tmp_path / "sweep"
    space = tmp_path / "space.yaml"
    space.write_text("lr0: {type: float, low: 0.000001, high: 0.05, log: true}\nmodel: [yolov8n.yaml, missing.yaml]\n")
    study = _study(out)
    for lr0, model in ((0.03, "yolov8n.yaml"), (0.025, "yolov8n.yaml"), (1e-6, "yolov8n.yaml"), (0.03, "missing.yaml")):
        study.enqueue_trial({"lr0": lr0, "model": model})
    argv = ["sweep", str(space), f"data={tiny_data}", *SIX_EPOCHS, "trials=4", "trials_per_gpu=2", f"out={out}"]
    argv += ["objective=mAP50", "prune_startup=2"]
    proc = run_cli(*argv)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    trials = {t.number: t for t in _study(out).trials}
    assert [trials[n].state.name for n in range(4)] == ["COMPLETE", "COMPLETE", "PRUNED", "FAIL"]
    assert "2 at once here on the CPU" in proc.stdout
    good = min(trials[0].value, trials[1].value)
    assert good > 0 and trials[2].value == pytest.approx(0.0, abs=1e-4)  # its last report, with the tie-break
    assert trials[2].user_attrs["objective"] == 0.0
    pruned_epochs = max(trials[2].intermediate_values)
    assert pruned_epochs <= 6 and sorted(trials[0].intermediate_values) == [1, 2, 3, 4, 5, 6]
    pruned_run = out / "trials" / "trial_0002"
    assert "pruned by the sweep" in (out / "logs" / "trial_0002.log").read_text()
    assert list((pruned_run / "checkpoints").glob("step-*/COMPLETE")), "a pruned trial keeps its checkpoint"
    assert (pruned_run / "weights" / "last.pt").is_file()
    assert "model YAML 'missing.yaml' not found" in trials[3].user_attrs["error"]

    rows = (out / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("trial,state,value") and [r.split(",")[1] for r in rows[1:]] == [
        "complete",
        "complete",
        "pruned",
        "fail",
    ]
    assert float(rows[1].split(",")[2]) >= float(rows[2].split(",")[2])  # best first
    for png in ("history.png", "importance.png", "parallel.png", "epochs.png"):
        assert (out / png).stat().st_size > 1000, png

    # best.yaml is the best trial's configuration: `yoloscale train best.yaml` trains it again
    from yoloscale.config import load_config

    best = max((trials[0], trials[1]), key=lambda t: t.value)
    again = load_config(out / "best.yaml")
    trained = yaml.safe_load((out / "trials" / f"trial_{best.number:04d}" / "config.yaml").read_text())
    assert again.lr0 == best.params["lr0"] and again.model == "yolov8n.yaml"
    assert {k: v for k, v in again.to_dict().items() if k not in ("project", "name")} == {
        k: v for k, v in trained.items() if k not in ("project", "name")
    }

    status = run_cli("sweep", "--status", str(out))
    assert status.returncode == 0 and "pruned" in status.stdout and "missing.yaml" in status.stdout


def test_kill_9_then_the_same_command_continues_the_sweep(tiny_data, tmp_path):
    """The sweep process killed while two trials train: its trials write a checkpoint and exit (they die with
    their parent); the same command again keeps the finished trials, continues the interrupted ones from their
    checkpoints, and ends with the requested number of trials."""
    out = tmp_path / "sweep"
    space = tmp_path / "space.yaml"
    space.write_text("lr0: {type: float, low: 0.005, high: 0.03, log: true}\n")
    argv = ["sweep", str(space), f"data={tiny_data}", *SIX_EPOCHS, "trials=4", "trials_per_gpu=2", f"out={out}"]
    argv.append("log_interval=1")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "yoloscale", *argv], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:  # one trial finished, a later one has a checkpoint
        text = (tmp_path / "first.log").read_text()
        later = [out / "trials" / f"trial_{n:04d}" for n in (2, 3)]
        if "finished" in text and any(list((d / "checkpoints").glob("step-*/COMPLETE")) for d in later):
            break
        time.sleep(0.2)
    else:
        pytest.fail("no trial finished: " + (tmp_path / "first.log").read_text()[-3000:])
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    done = [line.split()[1] for line in (tmp_path / "first.log").read_text().splitlines() if "finished" in line]
    finished_runs = {n: (out / "trials" / f"trial_{int(n):04d}" / "results.csv").read_bytes() for n in done}

    proc = run_cli(*argv)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = _study(out)
    counted = [t for t in study.trials if not t.user_attrs.get("interrupted")]
    assert len(counted) == 4 and all(t.state.name == "COMPLETE" for t in counted), proc.stdout
    assert "queued to continue" in proc.stdout
    for n, metrics in finished_runs.items():  # no finished trial ran again
        assert (out / "trials" / f"trial_{int(n):04d}" / "results.csv").read_bytes() == metrics
        assert f"trial {n} on" not in proc.stdout
    continued = [t for t in counted if t.user_attrs.get("resumes") is not None and t.user_attrs.get("resume_dir")]
    resumed = [t for t in continued if t.user_attrs["run_dir"] == t.user_attrs["resume_dir"]]
    assert resumed, proc.stdout  # the trial that had a checkpoint when the sweep was killed
    for t in continued:
        run_log = (out / "logs" / f"trial_{t.number:04d}.log").read_text()
        assert sorted(t.intermediate_values) == [1, 2, 3, 4, 5, 6]
        if t in resumed:
            assert "resumed from" in run_log
        else:  # killed before its first checkpoint: it starts over in its own folder
            assert "resumed from" not in run_log and t.user_attrs["run_dir"].endswith(f"trial_{t.number:04d}")
