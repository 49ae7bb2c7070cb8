"""What cuDNN's settings cost at the start and give in the steady state: our real train_step on one resident batch,
one fresh process per setting (cuDNN's autotuning cache is per process).

    python benchmarks/gpu/cudnn_probe.py OUT_DIR [model=yolo11x.yaml imgsz=640 batch=32 ...]

Settings: cuDNN autotuning (benchmark) on/off, cuDNN's deterministic algorithms (Ultralytics' deterministic=True:
torch.use_deterministic_algorithms(warn_only) + cudnn.deterministic) on/off, channels_last parameters (Ultralytics
converts the model; ours keep them contiguous and make only the input channels_last) on/off; fp16 and bf16.
Prints and writes OUT_DIR/cudnn.json: the first micro-step's seconds (autotuning happens there) and the steady
img/s (median of 3 windows of 10 micro-steps after 10).
"""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = [  # (benchmark, deterministic, channels_last parameters, precision)
    (1, 0, 0, "fp16"),
    (0, 0, 0, "fp16"),
    (0, 1, 0, "fp16"),
    (0, 1, 1, "fp16"),
    (1, 0, 1, "fp16"),
    (0, 0, 1, "fp16"),
    (1, 0, 0, "bf16"),
    (0, 1, 1, "bf16"),
]


def child(out: Path, bench: int, det: int, cl: int, precision: str, overrides: list[str]) -> dict:
    import torch

    from yoloscale.config import load_config
    from yoloscale.training.synth import write_synthetic_dataset
    from yoloscale.training.trainer import Trainer

    data = out / "data" / "data.yaml"
    if not data.exists():
        write_synthetic_dataset(out / "data", n_train=64, n_val=8, size=640 if torch.cuda.is_available() else 64)
    name = f"b{bench}d{det}c{cl}-{precision}"
    cfg = load_config(
        None,
        [
            f"data={data}",
            "workers=2",
            "epochs=1",
            "val=False",
            "plots=False",
            f"precision={precision}",
            f"cudnn_benchmark={bool(bench)}",
            f"project={out / 'runs'}",
            f"name={name}",
            *overrides,
        ],
    )
    trainer = Trainer(cfg)
    if det:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
    if cl:
        trainer.raw_model.to(memory_format=torch.channels_last)
    batch = trainer.prepare_batch(next(iter(trainer.train_loader)))
    trainer.prepare_batch = lambda b: b
    trainer.model.train()
    times = []
    for i in range(41):
        start = time.perf_counter()
        trainer.train_step(dict(batch))
        if torch.cuda.is_available() and (i == 0 or i >= 10 and (i - 10) % 10 == 0):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    ends = [sum(times[: j + 1]) for j in range(len(times))]
    windows = [10 * trainer.batch / (ends[a + 10] - ends[a]) for a in (10, 20, 30)]
    return {
        "benchmark": bench,
        "deterministic": det,
        "channels_last_params": cl,
        "precision": precision,
        "first_step_s": times[0],
        "img_s": statistics.median(windows),
        "windows": windows,
        "peak_GiB": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0,
    }


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    if overrides and overrides[0] == "--child":
        bench, det, cl, precision = overrides[1:5]
        result = child(out, int(bench), int(det), int(cl), precision, overrides[5:])
        print("RESULT " + json.dumps(result), flush=True)
        return
    rows = []
    defaults = ["model=yolo11x.yaml", "imgsz=640", "batch=32"]
    for bench, det, cl, precision in SETTINGS:
        cmd = [
            sys.executable,
            __file__,
            str(out),
            "--child",
            str(bench),
            str(det),
            str(cl),
            precision,
            *defaults,
            *overrides,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{bench} {det} {cl} {precision}: failed\n{proc.stderr[-1500:]}", flush=True)
            continue
        rows.append(json.loads(line[7:]))
        r = rows[-1]
        print(
            f"benchmark={bench} deterministic={det} channels_last_params={cl} {precision}: first step "
            f"{r['first_step_s']:.1f} s, {r['img_s']:.1f} img/s, peak {r['peak_GiB']:.1f} GiB",
            flush=True,
        )
    (out / "cudnn.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
