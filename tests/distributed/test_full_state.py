"""Resuming across backends and world sizes (backend/full_state.py, zero_reshard.py), on the CPU over gloo: a
checkpoint in each backend's own layout, loaded into another backend (or ZeRO on another world size), holds every
weight and optimizer state of the run that saved it bit for bit; on the saving world size the next step is that
run's next step."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT

# saved by (backend, optimizer, world) -> loaded into [(backend, world)]; the first load keeps the world size
CASES = [
    (("ddp", "AdamW", 2), [("fsdp", 2), ("zero3", 1)]),
    (("fsdp", "SGD", 2), [("zero2", 2), ("ddp", 1)]),
    (("zero2", "SGD", 2), [("ddp", 2), ("zero2", 1)]),
    (("zero3", "AdamW", 1), [("ddp", 1), ("zero3", 2)]),  # ddp: DeepSpeed's per-group AdamW step into torch's
    # offload: the optimizer steps fp32 partitions in CPU memory (the same files, written from there)
    (("zero2+optimizer", "SGD", 2), [("zero2+optimizer", 2), ("zero3+params", 1)]),
]
IDS = [f"{b}-{o}-{w}" for (b, o, w), _ in CASES]


def _torchrun(world: int, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(world),
        str(ROOT / "tests/distributed/full_state_worker.py"),
        *args,
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"{args} on {world} process(es) failed:\n{run.stderr[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = {}
    for (backend, optimizer, world), loads in CASES:
        d = tmp_path_factory.mktemp(backend)
        _torchrun(world, backend, optimizer, "save", str(d))
        for target, target_world in loads:
            _torchrun(target_world, target, optimizer, "load", str(d), backend)
        out[backend] = d
    return out


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("saved_by,loads", CASES, ids=IDS)
def test_every_tensor_arrives_whole(runs, saved_by, loads):
    saved = _load(runs[saved_by[0]] / "saved.pt")
    assert any(k.startswith(("momentum_buffer:", "exp_avg:")) and v.abs().sum() > 0 for k, v in saved.items())
    for target, world in loads:
        loaded = _load(runs[saved_by[0]] / f"loaded-{target}-{world}.pt")
        assert loaded.keys() == saved.keys(), f"{saved_by} -> {target} on {world}"
        for k, v in saved.items():
            assert torch.equal(loaded[k], v), f"{k} differs: {saved_by} -> {target} on {world} process(es)"


@pytest.mark.slow
@pytest.mark.parametrize("saved_by,loads", CASES, ids=IDS)
def test_export_reads_the_weights_of_every_layout(runs, saved_by, loads):
    """full_state.read_weights (what `yoloscale export` uses without an EMA) on one process, without DeepSpeed or a
    process group running: DDP's safetensors, FSDP2's DCP shards, ZeRO-2/3 partitions."""
    from yoloscale.backend.full_state import read_weights

    weights = read_weights(runs[saved_by[0]] / "ckpt", saved_by[0].partition("+")[0])
    saved = _load(runs[saved_by[0]] / "saved.pt")
    for k, v in saved.items():
        if k.startswith("weight:"):
            assert torch.equal(weights[k.removeprefix("weight:")], v), k
    assert any("running_mean" in k for k in weights)  # BatchNorm's buffers too


@pytest.mark.slow
@pytest.mark.parametrize("saved_by,loads", CASES, ids=IDS)
def test_the_next_step_is_the_saving_runs(runs, saved_by, loads):
    backend, _, world = saved_by
    d = runs[backend]
    before = _load(d / f"next-{backend}-{world}.pt")
    (same, _), (other, other_world) = loads
    after = _load(d / f"resumed-{same}-{world}.pt")
    assert after["losses"][0] == pytest.approx(before["losses"][2], rel=1e-6)
    for k, v in before["weights"].items():
        torch.testing.assert_close(after["weights"][k], v, rtol=1e-5, atol=1e-6, msg=f"{backend} -> {same}: {k}")
    moved, saved = _load(d / f"resumed-{other}-{other_world}.pt"), _load(d / "saved.pt")  # another world trains on
    assert torch.isfinite(torch.tensor(moved["losses"])).all()
    assert sum(not torch.equal(v, saved[k]) for k, v in moved["weights"].items()) > 50
