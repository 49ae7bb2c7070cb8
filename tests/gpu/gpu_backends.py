"""GPU check of every backend: loss parity with DDP, sharded save -> resume, precision x grad_ckpt matrix.

usage: python tests/gpu/gpu_backends.py OUT_DIR [--gpus N] [--model yolov8s.yaml] [--parallel K] [--backends ddp,...]
       [--only resume|fp16|offload]
From the same initial weights and data (seed 0, workers=0), two epochs of yolov8s at 320 px (32 optimizer steps on one
GPU, 16 on two) on DDP, FSDP2, ZeRO-1/2/3 in bf16 and fp16, each also with grad_ckpt=all (DDP, FSDP2, ZeRO-3 in
bf16 also with grad_ckpt_recompute=cheap), and bf16 with offload (FSDP2 and ZeRO-3 offload=params, ZeRO-2
offload=optimizer; each also resumed offloaded); ZeRO-2 fp16 also with offload=optimizer, and resumed.
Each run's per-step losses are compared with DDP's in the same precision; then each backend resumes from its epoch-1
checkpoint and must repeat the uninterrupted run's next losses, and so must a resume with another backend
(backend/full_state.py). With --gpus 2, DDP, FSDP, ZeRO-2 and ZeRO-3 checkpoints are also resumed on the other GPU
count (2 -> 1, 1 -> 2). Runs that do not depend on each other run --parallel at a time. Prints a table, writes
OUT_DIR/backends.json. Run by test_gpu_backends.py (skipped without CUDA).
"""

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

WORKER = Path(__file__).with_name("backend_run_worker.py")
BACKENDS = ("ddp", "fsdp", "zero1", "zero2", "zero3")
# Largest per-step relative difference of the summed loss allowed against DDP. cuDNN's autotuned kernels are not
# deterministic, and in the first steps of training small differences grow: on an H100 (2026-11-23) DDP against
# itself (uninterrupted vs resumed) already differed by up to 6.2e-2 over 16 steps in bf16. The bound is ~2x that.
TOLERANCE = {"bf16": 0.15, "fp16": 0.15, "fp32": 0.15}
RESUME_TOLERANCE = 0.1
# Resumed on another GPU count, the global batch and the order of images change: the resumed epoch's mean loss must
# stay near the uninterrupted run's (a reset or a wrongly loaded optimizer/EMA shows as a jump well above this).
# offload runs (bf16, --only all): the stage each backend offloads at
OFFLOAD = {"fsdp": "params", "zero2": "optimizer", "zero3": "params"}
CROSS_WORLD_TOLERANCE = (
    0.25  # bit-exact resume is tested on the CPU (test_checkpoint.py), where kernels are deterministic
)


def run(out: Path, name: str, gpus: int, overrides: list[str]) -> dict:
    log = out / f"{name}.log"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(gpus),
        str(WORKER),
        str(out / f"{name}.json"),
        str(out / "runs"),
        name,
        *overrides,
    ]
    env = dict(os.environ, PYTHONPATH=str(WORKER.parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        return {"name": name, "error": log.read_text()[-2500:]}
    return {"name": name, **json.loads((out / f"{name}.json").read_text())}


def other_world_resumes(out: Path, a, common: dict[str, list[str]], results: dict) -> list[tuple]:
    """2 -> 1 and 1 -> 2 GPUs (DDP, FSDP2's DCP, ZeRO-2/3 through backend/zero_reshard.py): the epoch-1 checkpoint
    of each run resumed on the other GPU count, as (name, gpus, overrides) jobs."""
    jobs = []
    for b in ("ddp", "fsdp", "zero2", "zero3"):
        for saved, gpus in ((results.get(f"{b}-bf16", {}), 1), (results.get(f"{b}-bf16-1gpu", {}), a.gpus)):
            if "run_dir" in saved:
                ckpt = sorted(Path(saved["run_dir"], "checkpoints").glob("step-*"))[0]  # the epoch-1 end
                jobs.append((f"{saved['name']}-resume-on-{gpus}gpu", gpus, [*common[b], f"resume={ckpt}"]))
    return jobs


def results_of(out: Path, name: str) -> dict:
    path = out / f"{name}.json"
    return {"name": name, **json.loads(path.read_text())} if path.exists() else {}


def total(step: dict) -> float:
    return sum(v for k, v in step.items() if k not in ("step", "lr", "img_s", "mem_GiB"))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--model", default="yolov8s.yaml")
    p.add_argument("--parallel", type=int, default=3)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument(
        "--only",
        choices=("all", "resume", "fp16", "offload"),
        default="all",
        help="resume: only the bf16 runs and their resumes (same and other backend, other GPU count); "
        "fp16: only the fp16 runs (with grad_ckpt, ZeRO-2 offloaded and resumed); "
        "offload: only DDP bf16 (the reference) and the bf16 offload runs, each resumed offloaded",
    )
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    backends = a.backends.split(",")
    from yoloscale.training.synth import write_synthetic_dataset

    data = write_synthetic_dataset(out / "shapes", 256, 64, 160, 0)
    common = {b: [f"data={data}", f"backend={b}", "precision=bf16", f"model={a.model}"] for b in BACKENDS}
    fp16 = {b: [f"data={data}", f"backend={b}", "precision=fp16", f"model={a.model}"] for b in BACKENDS}
    # the first bf16 runs are the checkpoints every resume starts from; --only resume skips the other parity runs
    jobs = [(f"{b}-bf16", a.gpus, common[b]) for b in backends] if a.only in ("all", "resume") else []
    if a.only == "offload":
        jobs = [("ddp-bf16", a.gpus, common["ddp"])]
    if a.only in ("all", "fp16"):
        jobs += [(f"{b}-fp16", a.gpus, fp16[b]) for b in backends]
        jobs += [(f"{b}-fp16-ckpt", a.gpus, [*fp16[b], "grad_ckpt=all"]) for b in backends]
        jobs += [("zero2-fp16-optimizer", a.gpus, [*fp16["zero2"], "offload=optimizer"])] if "zero2" in backends else []
    if a.only == "all":
        jobs += [(f"{b}-bf16-ckpt", a.gpus, [*common[b], "grad_ckpt=all"]) for b in backends]
        jobs += [
            (f"{b}-bf16-ckpt-cheap", a.gpus, [*common[b], "grad_ckpt=all", "grad_ckpt_recompute=cheap"])
            for b in backends
            if b in ("ddp", "fsdp", "zero3")
        ]
    if a.only in ("all", "offload"):
        jobs += [
            (f"{b}-bf16-{OFFLOAD[b]}", a.gpus, [*common[b], f"offload={OFFLOAD[b]}"]) for b in backends if b in OFFLOAD
        ]
    if a.gpus > 1 and a.only in ("all", "resume"):  # the one-GPU runs whose checkpoints resume on a.gpus
        jobs += [(f"{b}-bf16-1gpu", 1, common[b]) for b in ("ddp", "fsdp", "zero2", "zero3") if b in backends]
    results = {jobs[0][0]: run(out, *jobs[0])}  # alone: it writes Ultralytics' label cache
    with ThreadPoolExecutor(a.parallel) as pool:
        results.update({r["name"]: r for r in pool.map(lambda j: run(out, *j), jobs[1:])})
    resumes = []
    for b in backends if a.only != "offload" else ():
        first = results.get(f"{b}-bf16", {})
        if "run_dir" not in first:
            continue
        ckpt = sorted(Path(first["run_dir"], "checkpoints").glob("step-*"))[0]  # the epoch-1 end
        resumes.append((f"{b}-bf16-resume", a.gpus, [*common[b], f"resume={ckpt}"]))
        # and with another backend (backend/full_state.py): the continuation must follow the saving run's
        other = {"ddp": "zero2", "fsdp": "ddp", "zero1": "fsdp", "zero2": "ddp", "zero3": "fsdp"}[b]
        resumes.append((f"{b}-bf16-resume-as-{other}", a.gpus, [*common[other], f"resume={ckpt}"]))
    if "run_dir" in results.get("zero2-fp16", {}):  # fp16 on DeepSpeed: the loss scale is restored with the rest
        ckpt = min(Path(results["zero2-fp16"]["run_dir"], "checkpoints").glob("step-*"))
        resumes.append(("zero2-fp16-resume", a.gpus, [*fp16["zero2"], f"resume={ckpt}"]))
    for b, where in OFFLOAD.items():  # offloaded runs resume offloaded (checkpoints of CPU-resident state)
        first = results.get(f"{b}-bf16-{where}", {})
        if "run_dir" in first:
            ckpt = min(Path(first["run_dir"], "checkpoints").glob("step-*"))
            resumes.append((f"{b}-bf16-{where}-resume", a.gpus, [*common[b], f"offload={where}", f"resume={ckpt}"]))
    if a.gpus > 1 and a.only != "offload":
        resumes += other_world_resumes(out, a, common, results)
    with ThreadPoolExecutor(a.parallel) as pool:
        results.update({r["name"]: r for r in pool.map(lambda j: run(out, *j), resumes)})

    rows, ok = [], True
    for name, r in results.items():
        prec = name.split("-")[1]
        ref = results.get(f"ddp-{prec}", {})
        if "error" in r:
            rows.append((name, "ERROR", "", "", r["error"].strip().splitlines()[-1][:90]))
            ok = False
            continue
        if "-resume-on-" in name:  # another world size: the steps differ, so compare the epoch's mean loss
            full = results.get(name.split("-resume-on-")[0], {}).get("steps", [])
            mine = [total(s) for s in r["steps"]]
            want = [total(s) for s in full[len(full) // 2 :]]  # the uninterrupted run's second epoch
            worst = abs(sum(mine) / max(len(mine), 1) - sum(want) / max(len(want), 1)) / (sum(want) / max(len(want), 1))
            good = len(mine) > 0 and all(map(math.isfinite, mine)) and worst < CROSS_WORLD_TOLERANCE
            rows.append(
                (
                    name,
                    "ok" if good else "FAIL",
                    f"{worst:.2e}",
                    "",
                    f"{len(mine)} steps after resume; epoch-2 mean loss vs the run that saved it",
                )
            )
            ok &= good
            continue
        if name.endswith("-1gpu"):  # the one-GPU run that a two-GPU resume starts from
            rows.append((name, "ok", "", f"{r['peak_GiB']:.2f}", f"{len(r['steps'])} steps on 1 GPU"))
            continue
        if name.endswith("-resume") or "-resume-as-" in name:
            saved = name.split("-resume-as-")[0] if "-resume-as-" in name else name.removesuffix("-resume")
            full = results.get(saved, {}).get("steps", [])
            n = len(r["steps"])
            mine, want = [total(s) for s in r["steps"]], [total(s) for s in full[-n:]]
            worst = max(abs(x - y) / abs(y) for x, y in zip(mine, want)) if n else float("nan")
            good = n > 0 and worst < RESUME_TOLERANCE
            rows.append(
                (name, "ok" if good else "FAIL", f"{worst:.2e}", "", f"{n} steps after resume vs uninterrupted")
            )
        else:
            mine, want = [total(s) for s in r["steps"]], [total(s) for s in ref.get("steps", [])]
            worst = max((abs(x - y) / abs(y) for x, y in zip(mine, want)), default=float("nan"))
            good = len(mine) == len(want) and worst < TOLERANCE[prec] and r["skipped_steps"] < 3
            rows.append(
                (
                    name,
                    "ok" if good else "FAIL",
                    f"{worst:.2e}",
                    f"{r['peak_GiB']:.2f}",
                    f"{len(mine)} steps, skipped {r['skipped_steps']}, {r['seconds']:.0f} s",
                )
            )
        ok &= good
    print(f"{'run':24} {'result':6} {'max rel. diff':>13} {'peak GiB':>8}  notes")
    for row in rows:
        print(f"{row[0]:24} {row[1]:6} {row[2]:>13} {row[3]:>8}  {row[4]}")
    json.dump({"tolerance": TOLERANCE, "rows": rows, "results": results}, open(out / "backends.json", "w"), indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
