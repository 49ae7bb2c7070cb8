"""DeepSpeed ZeRO checkpoints resumed on another number of processes (backend/zero_reshard.py), on the CPU over gloo:
after the load every weight, buffer, optimizer state and step counter equals the saved run's, and on the same world
size the next step is the step the saved run took."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# (stage, optimizer, world that saves, worlds that load): both directions, both ZeRO layouts, SGD and AdamW states
CASES = [("zero2", "SGD", 2, (1, 2)), ("zero3", "AdamW", 1, (2, 1))]


def _torchrun(world: int, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                          str(ROOT / "tests/zero_reshard_worker.py"), *args], env=env, capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, f"{args} on {world} failed:\n{run.stderr[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = {}
    for stage, optimizer, saves, loads in CASES:
        d = tmp_path_factory.mktemp(stage)
        _torchrun(saves, stage, optimizer, "save", str(d))
        for world in loads:
            _torchrun(world, stage, optimizer, "load", str(d))
        out[stage] = d
    return out


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("stage,optimizer,saves,loads", CASES)
def test_zero_checkpoint_loads_whole_on_any_world_size(runs, stage, optimizer, saves, loads):
    saved = _load(runs[stage] / "saved.pt")
    assert any(k.startswith(("momentum_buffer:", "exp_avg:")) for k in saved["state"])
    assert any(v.abs().sum() > 0 for k, v in saved["state"].items() if k.startswith(("momentum_buffer", "exp_avg")))
    for world in loads:
        loaded = _load(runs[stage] / f"loaded-{world}.pt")
        assert loaded["state"].keys() == saved["state"].keys()
        for k, v in saved["state"].items():
            assert torch.equal(loaded["state"][k], v), f"{k} differs after loading on {world} process(es)"
        assert repr(loaded["counters"]) == repr(saved["counters"])  # global steps, samples, skipped, AdamW steps


@pytest.mark.slow
@pytest.mark.parametrize("stage,optimizer,saves,loads", CASES)
def test_zero_checkpoint_resumed_on_the_same_world_takes_the_same_step(runs, stage, optimizer, saves, loads):
    before, after = _load(runs[stage] / f"next-{saves}.pt"), _load(runs[stage] / f"resumed-{saves}.pt")
    assert after["losses"] == [before["losses"][2]]
    for k, v in before["weights"].items():
        torch.testing.assert_close(after["weights"][k], v, rtol=0, atol=0)
    other = [w for w in loads if w != saves][0]  # the other world size trains on: a finite loss, the weights move
    moved, saved = _load(runs[stage] / f"resumed-{other}.pt"), _load(runs[stage] / "saved.pt")["state"]
    assert torch.isfinite(torch.tensor(moved["losses"])).all()
    assert sum(not torch.equal(moved["weights"][k[7:]], v) for k, v in saved.items() if k.startswith("weight:")) > 50
