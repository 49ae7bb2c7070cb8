#!/usr/bin/env bash
# The built wheel, installed into a clean venv and run from outside the source tree: the templates must come from
# the package (importlib.resources), not from a checkout. A short ZeRO-2 step on the CPU (DeepSpeed over gloo, one
# process) from the shipped JSON template, and `launch slurm` / `launch templates` from the installed command.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT  # a second venv of several GB on a disk CI shares
python3 -m pip wheel -q --no-deps -w "$tmp/dist" "$src"
python3 -m venv "$tmp/venv"
# shellcheck disable=SC1091
. "$tmp/venv/bin/activate"
python3 -m pip install -q "$(ls "$tmp"/dist/yoloscale-*.whl)[deepspeed]"
cd "$tmp"  # nothing of the checkout on the path
python3 - <<'PY'
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29761", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
import yoloscale
from yoloscale import backend
from yoloscale.backend.zero import render_ds_config, template_path
from yoloscale.config import load_config
assert "site-packages" in yoloscale.__file__ and template_path(2).is_file(), (yoloscale.__file__, template_path(2))
torch.Tensor.record_stream = lambda self, stream: None  # DeepSpeed calls this CUDA-only method on the CPU too
dist.init_process_group("gloo")
cfg = load_config(None, ["backend=zero2", "grad_clip=10"])
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                  config=render_ds_config(cfg, "fp32", 2, 1))
be = backend.get(cfg)
before = next(model.parameters()).detach().clone()
loss = engine(torch.rand(2, 3, 8, 8)).square().sum()
be.backward(loss, engine, sync=True)
assert be.step(engine, None, 10.0).item() == 0 and not torch.equal(before, next(model.parameters()))
print("zero2 step from the wheel's template: ok")
PY
yoloscale launch slurm backend=zero2 launcher=deepspeed nodes=1 gpus_per_node=2 project="$tmp/p" name=smoke
test -s "$tmp/p/smoke.sbatch"
yoloscale launch slurm generic=True launcher=torchrun nodes=2 | grep -q "torch.distributed.run"
yoloscale launch templates out="$tmp/t"
test -f "$tmp/t/ds_configs/zero3.json" && test -f "$tmp/t/slurm/one-node-8gpu.sbatch" && test -f "$tmp/t/accelerate/fsdp.yaml"
echo "wheel smoke test: ok"
