"""Backend selection: FSDP2 and ZeRO parity with DDP (gloo), launcher agreement, precision and compile. The DeepSpeed
JSON, fp16 repairs and ZeRO-3 units: test_deepspeed.py."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, TINY, run_cli
from yoloscale import backend
from yoloscale.backend import check_launcher_agreement
from yoloscale.commands.settings import training_config
from yoloscale.config import load_config
from yoloscale.errors import UserError


def _cfg(*overrides):
    return training_config(None, list(overrides))


def _backend(*overrides):
    return backend.get(_cfg(*overrides))


# --- FSDP2 and DeepSpeed ZeRO on a 2-process gloo group --------------------------------------------------------------
MODES = (
    "ddp",
    "fsdp",
    "fsdp_ckpt",
    "fsdp_cheap",
    "zero2",
    "zero3",
    "zero3_ckpt",
    "zero3_cheap",
    "ddp_bf16",
    "zero2_bf16",
    "ddp_fp16",
    "zero2_fp16",
    "zero3_fp16",
    "fsdp_ckpt_compile",
    "zero3_ckpt_compile",
)


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    # the eager modes share one process pair (start-up paid once); a compiled mode, alone, gets fresh Dynamo state
    eager = [m for m in MODES if not m.endswith("_compile")]
    for modes in [eager, *([m] for m in MODES if m not in eager)]:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "2",
                str(ROOT / "tests/distributed/sharded_parity_worker.py"),
                ",".join(modes),
                str(out),
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, f"{modes} worker failed:\n{run.stderr[-3000:]}"
    return {m: torch.load(out / f"{m}.pt") for m in MODES}


@pytest.mark.slow
@pytest.mark.parametrize("mode", [m for m in MODES if not m.startswith("ddp")])
def test_sharded_backends_reproduce_ddp(parity, mode):
    """Losses, weights and the sharded EMA (gathered) agree with DDP after three steps (fp32 reduction order only):
    FSDP2 with our wrap policy, ZeRO-2, and ZeRO-3 with its whole-layer gathers, with and without grad_ckpt (both
    recompute modes), and with every layer compiled (compile_scope=layers, aot_eager) on FSDP2 + grad_ckpt and ZeRO-3 +
    grad_ckpt, the backends whose hooks run around the compiled layers (ZeRO-2 has none in the forward and passed the
    same comparison by hand); and
    ZeRO-2 under bf16 autocast with DDP under bf16 autocast, which needs DeepSpeed to reduce gradients in fp32 (its
    default, bf16 for Conv2d weights, was 4e-3 apart after one step); and
    ZeRO-2/3 under fp16 autocast with DDP and torch's GradScaler, from a loss scale at which the first step overflows:
    the same steps are skipped with the same loss scales. Without our loss scaler,
    DeepSpeed's GradScaler never came down and ZeRO-2 skipped all three."""
    suffix = next((s for s in ("_bf16", "_fp16") if mode.endswith(s)), "")
    ddp, other = parity["ddp" + suffix], parity[mode]
    assert other["losses"] == pytest.approx(ddp["losses"], rel=1e-5)
    # Which later fp16 steps overflow depends on the CPU's fp16 kernels (AVX-512-FP16 rounds differently), so what
    # is asserted is what holds on any CPU: the same steps are skipped as DDP's in this run, the first step overflows
    # from the chosen scale, at least one step is applied, and the scale halves on each skip and only then.
    assert other["skipped"] == ddp["skipped"]
    if suffix == "_fp16":
        assert ddp["skipped"][0] and not all(ddp["skipped"])
        assert other["scales"] == ddp["scales"]
        for before, after, skipped in zip([2.0**14, *ddp["scales"]], ddp["scales"], ddp["skipped"]):
            assert after == (before / 2 if skipped else before)
    assert ddp["losses"][0] != ddp["losses"][2]  # the steps did train
    for part in ("weights", "ema"):
        assert ddp[part].keys() == other[part].keys()
        for k, v in ddp[part].items():
            torch.testing.assert_close(other[part][k], v, rtol=1e-4, atol=1e-5, msg=f"{part} {k}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "zero1", "zero2", "zero3"])
def test_sharded_musgd_steps_like_ultralytics_musgd_under_ddp(musgd, backend):
    """MuSGD on FSDP2 shards and ZeRO partitions (ShardedMuSGD: whole matrices assembled for Newton-Schulz only)
    equals Ultralytics' MuSGD under DDP, with gradient accumulation over two micro-steps marked the way
    backend.micro_step marks them: the same losses and weights after three steps (musgd_parity_worker.py)."""
    ddp, other = musgd["ddp"], musgd[backend]
    assert other["losses"] == pytest.approx(ddp["losses"], rel=1e-6)
    assert ddp["losses"][0] != ddp["losses"][-1]
    for k, v in ddp["weights"].items():
        torch.testing.assert_close(other["weights"][k], v, rtol=1e-6, atol=1e-7, msg=k)


@pytest.fixture(scope="module")
def musgd(tmp_path_factory):
    out = tmp_path_factory.mktemp("musgd")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    for name in ("ddp", "fsdp", "zero1", "zero2", "zero3"):
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "2",
                str(ROOT / "tests/distributed/musgd_parity_worker.py"),
                name,
                str(out / f"{name}.pt"),
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, f"{name} worker failed:\n{run.stderr[-3000:]}"
    return {b: torch.load(out / f"{b}.pt") for b in ("ddp", "fsdp", "zero1", "zero2", "zero3")}


CLIP_WORKER = """
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from yoloscale.backend.fsdp import clip_grad_norm_offloaded
dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))  # 5 rows: uneven shards on 2 ranks
ref = [p.detach().clone().requires_grad_() for p in model.parameters()]
for m in model:
    fully_shard(m)
fully_shard(model)
x = torch.randn(4, 7)
model(x).square().sum().backward()
torch.nn.functional.linear(torch.nn.functional.linear(x, ref[0], ref[1]), ref[2], ref[3]).square().sum().backward()
want = torch.nn.utils.clip_grad_norm_(ref, 0.5)
assert want > 0.5  # so the gradients are scaled
norm = clip_grad_norm_offloaded(model.parameters(), 0.5, torch.device("cpu"))
torch.testing.assert_close(norm, want)
for p, r in zip(model.parameters(), ref):
    torch.testing.assert_close(p.grad.full_tensor(), r.grad)
print("clipped", float(norm), float(want))
dist.barrier()
dist.destroy_process_group()
# as in sharded_parity_worker.py: after fully_shard on gloo, torch 2.14 sometimes aborts in C++ static destruction
# ("terminate called without an active exception"; once in CI). Skip that teardown.
import os, sys
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)
"""


def test_fsdp_offload_clipping_matches_torch(tmp_path):
    """FSDP2 offload=params clips from the local gradient shards (NCCL cannot reduce CPU tensors): same total norm
    and clipped gradients as torch's clip_grad_norm_ on the unsharded model (2 gloo ranks, uneven shards)."""
    script = tmp_path / "clip.py"
    script.write_text(CLIP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("clipped") == 2


# --- the launcher's configuration against ours -----------------------------------------------------------------------
def _accelerate_env(config_file: str) -> dict:
    """The environment `accelerate launch --config_file F` gives the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", config_file, "-m", "yoloscale", "train"])
    args, *_ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = []
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_shipped_accelerate_configs_agree_only_with_their_backend(name):
    env = _accelerate_env(str(ROOT / f"launch/accelerate/{name}.yaml"))
    check_launcher_agreement(_backend(f"backend={name}"), env)  # the matching backend passes
    other = "zero2" if name in ("ddp", "fsdp") else "fsdp"
    if name != "ddp":
        with pytest.raises(UserError, match=f"backend={other}"):
            check_launcher_agreement(_backend(f"backend={other}"), env)


def test_launcher_precision_disagreement():
    check_launcher_agreement(_backend("precision=bf16"), {"ACCELERATE_MIXED_PRECISION": "no"})  # 'no' is no choice
    with pytest.raises(UserError, match="mixed_precision=fp16.*precision=bf16"):
        check_launcher_agreement(_backend("precision=bf16"), {"ACCELERATE_MIXED_PRECISION": "fp16"})


def test_deepspeed_launcher_flag_sets_or_checks_the_backend():
    from yoloscale.commands.train import _with_deepspeed_file

    ds = str(ROOT / "ds_configs/zero3.json")
    assert _with_deepspeed_file(None, ["epochs=1"], ds)[-2:] == ["backend=zero3", f"ds_config={ds}"]
    r = run_cli("train", "backend=zero1", "--deepspeed", ds, "--local_rank=0")
    assert r.returncode == 2 and "ZeRO stage 3" in r.stderr and "backend=zero1" in r.stderr
    assert "Traceback" not in r.stderr


def test_sharded_backends_need_gpus_and_bad_combinations_are_named():
    r = run_cli("train", "backend=fsdp")
    assert r.returncode == 2 and "needs CUDA GPUs" in r.stderr and "Traceback" not in r.stderr
    for bad, words in [
        ("offload=optimizer backend=fsdp", "offload=params"),
        ("offload=params backend=zero2", "zero3"),
        ("offload=optimizer", "sharded backend"),
        ("ds_config=x.json", "DeepSpeed"),
        ("backend=fsdp offload=params precision=fp16", "GradScaler"),
    ]:
        with pytest.raises(UserError, match=words):
            _cfg(*bad.split())


def test_load_state_uses_accelerate_where_it_can_and_whole_tensors_otherwise(monkeypatch):
    """Same layout: Accelerate's load_state (ZeRO: also the same world size); anything else: full_state.py."""

    class FakeAccelerator:
        num_processes = 2
        deepspeed_engine_wrapped = None

        def load_state(self, ckpt):
            calls.append(("accelerate", ckpt))

    calls = []
    monkeypatch.setattr(
        "yoloscale.backend.base.load_foreign", lambda acc, ckpt, saved, *rest: calls.append((saved, ckpt))
    )
    monkeypatch.setattr("yoloscale.backend.zero.Zero.engine", lambda self, acc: None)
    acc = FakeAccelerator()
    for saved, world, now in [
        ("ddp", 1, "ddp"),
        ("fsdp", 4, "fsdp"),
        ("zero2", 2, "zero2"),  # Accelerate's
        ("zero2", 1, "zero2"),
        ("zero3", 2, "fsdp"),
        ("ddp", 2, "zero1"),
    ]:
        _backend(f"backend={now}").load_state(acc, "ck", saved, world, model=None, optimizer=None, group_names=[])
    assert calls == [("accelerate", "ck")] * 3 + [("zero", "ck"), ("zero", "ck"), ("ddp", "ck")]


def test_whole_model_compile_trains_like_eager(tiny_data, tmp_path):
    """compile_scope=model compiles the training model in place (state-dict keys unchanged) and takes the same steps
    as eager. On the CPU with aot_eager (dynamo's graph capture + AOTAutograd's joint graph, without inductor's
    2-minute C++ build); inductor itself is measured on the GPU (docs/benchmarks.md). compile_scope=layers:
    tests/unit/test_compile.py."""
    from yoloscale.training.trainer import Trainer

    losses = {}
    for flag in (False, True):
        cfg = load_config(
            None,
            [
                f"data={tiny_data}",
                *TINY,
                "mosaic=0",
                "fliplr=0",
                "hsv_h=0",
                "hsv_s=0",
                "hsv_v=0",
                "translate=0",
                "scale=0",
                f"project={tmp_path}",
                f"name=c{flag}",
                f"compile={flag}",
                "compile_scope=model",
                "compile_backend=aot_eager",
            ],
        )
        trainer = Trainer(cfg)
        assert (trainer.raw_model._compiled_call_impl is not None) == flag
        assert not any("_orig_mod" in k for k in trainer.raw_model.state_dict())
        trainer.model.train()
        batches = iter(trainer.train_loader)
        for _ in range(3):
            trainer.train_step(next(batches))
        losses[flag] = list(trainer.epoch_losses.means().values())
    for a, b in zip(losses[False], losses[True]):
        assert abs(a - b) <= 1e-3 * max(abs(a), 1e-3), losses


def test_deepspeed_module_launch_puts_local_rank_before_the_subcommand():
    """`deepspeed --module yoloscale train ...` runs `python -m yoloscale --local_rank=0 train ...` (seen on GPUs:
    'unrecognized arguments: --local_rank=0' before the fix)."""
    proc = run_cli("--local_rank=0", "train", "--help")
    assert proc.returncode == 0, proc.stderr


def test_autocast_forward_computes_in_low_precision_and_returns_fp32():
    """What backend.prepare puts around an FSDP2 model (Accelerate's FSDP2 path adds no autocast: FSDP ran in fp32)."""
    from yoloscale.backend import autocast_forward

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    autocast_forward(model, torch.autocast("cpu", dtype=torch.bfloat16))
    out = model(torch.rand(2, 3, 8, 8))
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    assert model._original_forward(torch.rand(2, 3, 8, 8)).dtype == torch.float32 and seen[-1] == torch.float32


def test_one_zero_process_without_a_launcher_gets_the_variables_of_a_one_process_group(monkeypatch):
    """`yoloscale train backend=zero2` on one GPU, no torchrun: DeepSpeed needs a process group, which Accelerate makes
    only from a launcher's variables (without them its first barrier fails with a traceback)."""
    from yoloscale.backend.base import Backend
    from yoloscale.backend.zero import Zero

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    monkeypatch.setattr(os, "environ", env)
    seen = {}
    monkeypatch.setattr(Backend, "build_accelerator", lambda self, batch: seen.update(os.environ))
    monkeypatch.setattr(Zero, "uses_cuda", lambda self: True)
    _backend("backend=zero2").build_accelerator(4)
    assert (seen["RANK"], seen["LOCAL_RANK"], seen["WORLD_SIZE"]) == ("0", "0", "1") and seen["MASTER_PORT"].isdigit()
    launched = {**env, "RANK": "3", "WORLD_SIZE": "8"}  # under a launcher: its variables stay
    monkeypatch.setattr(os, "environ", launched)
    _backend("backend=zero2").build_accelerator(4)
    assert (seen["RANK"], seen["WORLD_SIZE"]) == ("3", "8")
