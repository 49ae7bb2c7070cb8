#!/usr/bin/env bash
# The faster-step settings against eager on one GPU, in one `yoloscale bench` run per part (docs/training.md):
# fused_bn_silu=True, compile=True (each layer), compile=True compile_scope=model; yolo11x, synthetic data.
# usage: benchmarks/gpu/measure_step.sh OUT_DIR PART
#   check: the fused kernels against eager on CUDA (tests/unit/workers/bn_silu_worker.py), one JSON line per case
#   640:   640 px, batch 32, fp16 and bf16, with Ultralytics' trainer in the same run
#   1280:  1280 px, batch 16, grad_ckpt=highres, bf16 (compile and fused against our own eager highres)
#   warm:  the 640 fp16 compile=True variant again: its first step with torch's caches warm
set -u
out=$1
part=$2
mkdir -p "$out"
size=$([ "$part" = 1280 ] && echo 1280 || echo 640)
[ -f "$out/data-$size/data.yaml" ] || python -m yoloscale data synth out="$out/data-$size" train=1120 val=8 size="$size" >/dev/null
common=(model=yolo11x.yaml workers=12 cache=ram "data=$out/data-$size/data.yaml" warmup=10 window=8)
case $part in
check) DEVICE=cuda python tests/unit/workers/bn_silu_worker.py | tee "$out/check.jsonl" ;;
640) python -m yoloscale bench "${common[@]}" imgsz=640 batch=32 precisions=fp16,bf16 skip=loader \
        variants="fused_bn_silu=True;compile=True;compile=True compile_scope=model" out="$out/640" ;;
1280) python -m yoloscale bench "${common[@]}" imgsz=1280 batch=16 grad_ckpt=highres precisions=bf16 \
        skip=ultralytics,loader variants="fused_bn_silu=True;compile=True" out="$out/1280" ;;
warm) python -m yoloscale bench "${common[@]}" imgsz=640 batch=32 precisions=fp16 skip=ultralytics,loader \
        variants="compile=True" out="$out/warm" ;;
*) echo "unknown part $part" >&2; exit 2 ;;
esac
