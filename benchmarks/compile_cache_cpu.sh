#!/usr/bin/env bash
# compile=True's first step with a cold and a warm Inductor cache (the cache folder under YOLOSCALE_CACHE), beside
# eager, on the CPU: yolov8n at 64 px, one epoch of 4 steps. Prints one line per run.
# usage: benchmarks/compile_cache_cpu.sh WORK_DIR   (WORK_DIR must not exist; about 3 minutes on 2 cores)
set -eu
work=$1
mkdir "$work"
export YOLO_OFFLINE=1 WANDB_MODE=disabled YOLOSCALE_CACHE=$work/cache
python -c "from pathlib import Path; from yoloscale.training.synth import write_synthetic_dataset as w; w(Path('$work/data'), n_train=32, n_val=8, size=96)"
for run in eager cold warm; do
    flag=$([ "$run" = eager ] && echo off || echo True)
    start=$(date +%s.%N)
    python -m yoloscale train data="$work/data/data.yaml" model=yolov8n.yaml imgsz=64 batch=8 nbs=8 workers=0 epochs=1 \
        val=False plots=False optimizer=SGD compile="$flag" project="$work/runs" name=$run >"$work/$run.log" 2>&1
    end=$(date +%s.%N)
    first=$(python -c "import json; print(json.load(open('$work/runs/$run/run_info.json'))['first_step_s'])")
    echo "$run (compile=$flag): whole run $(python -c "print(round($end - $start, 1))") s, first optimizer step $first s"
done
du -sh "$work/cache/torchinductor"
