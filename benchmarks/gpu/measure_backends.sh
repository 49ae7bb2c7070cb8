#!/usr/bin/env bash
# Throughput and peak memory of each backend on the GPUs of this machine (docs/backends.md).
# usage: benchmarks/gpu/measure_backends.sh OUT_DIR [GPUS]   e.g. GPUS=1 or 2 (comma list for scaling: 1,2)
# yolo11x at 640 px, batch 32 per GPU, 12 workers, cache=ram, synthetic data; `yoloscale bench` for each backend.
set -u
out=$1
gpus=${2:-1}
mkdir -p "$out"
python -m yoloscale data synth out="$out/data" train=1120 val=8 size=640 >/dev/null
common=(model=yolo11x.yaml imgsz=640 batch=32 workers=12 cache=ram "data=$out/data/data.yaml")
for spec in "ddp bf16,fp16" "fsdp bf16" "zero2 bf16" "zero3 bf16" "ddp bf16 grad_ckpt=all"; do
    read -r backend precisions extra <<<"$spec"
    name=$(tr ' =,' '-_+' <<<"$spec")
    python -m yoloscale bench "${common[@]}" "backend=$backend" ${extra:+"$extra"} gpus="$gpus" \
        precisions="$precisions" skip=ultralytics,loader warmup=10 window=8 out="$out/$name" \
        >"$out/$name.txt" 2>&1
    echo "== $spec"
    grep -E "yoloscale (loop|bare)|FAILED" "$out/$name.txt"
done
