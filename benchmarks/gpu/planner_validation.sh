#!/usr/bin/env bash
# The planner and the sweeps on one GPU, in parts that each fit a 10-minute machine call. From the repository root:
#   OUT=/path bash benchmarks/gpu/planner_validation.sh PART
#   accuracy640   yolo11x at 640: plan against real steps, backends ddp, zero2, fsdp (plan_accuracy.sh)
#   accuracy1280  yolo11x and yolov8s at 1280, ddp; and Ultralytics' largest batch at 1280 (largest_batch_probe.py)
#   quick         yolo11x at 640 (ddp, grad_ckpt off and all); Ultralytics' largest batch at 1280 against ours (all)
#   auto          train batch=auto (grad_ckpt=auto) one epoch on each backend: the log's planned against real peak
#   sweep         sweep_packing.sh: 8 trials with one, two and auto trials per GPU
set -euo pipefail
OUT=${OUT:?set OUT to an output folder}
part=${1:?give a part}
work=${WORK:-/tmp/planval}
mkdir -p "$OUT" "$work"
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1 YOLOSCALE_CACHE="$work/cache"
here=$(cd "$(dirname "$0")" && pwd)

synth() {  # synth SIZE N: N images in 8 parallel parts; prints the data.yaml
  local size=$1 n=$2 dir=$work/data$1
  if [ ! -f "$dir/data.yaml" ]; then
    for i in 0 1 2 3 4 5 6 7; do
      python3 -m yoloscale data synth out="$dir/p$i" train=$((n / 8)) val=8 size="$size" seed="$i" >/dev/null &
    done
    wait
    python3 - "$dir" >"$dir/data.yaml" <<'PY'
import sys, yaml
d = sys.argv[1]
print(yaml.safe_dump({"path": d, "train": [f"p{i}/images/train" for i in range(8)], "val": "p0/images/val",
                      "names": yaml.safe_load(open(f"{d}/p0/data.yaml"))["names"]}))
PY
  fi
  echo "$dir/data.yaml"
}

case $part in
accuracy640)
  data=$(synth 640 2800)
  DATA=$data WARMUP=2 WINDOW=1 WORK=$work bash "$here/plan_accuracy.sh" yolo11x.yaml 640 ddp,zero2,fsdp ;;
accuracy1280)
  data=$(synth 1280 1200)
  python3 "$here/largest_batch_probe.py" "$OUT/ultralytics-largest-yolo11x-1280.json" yolo11x.yaml 1280 \
    | tail -3 || true
  DATA=$data WARMUP=2 WINDOW=1 WORK=$work bash "$here/plan_accuracy.sh" yolo11x.yaml 1280 ddp
  DATA=$data WARMUP=2 WINDOW=1 WORK=$work bash "$here/plan_accuracy.sh" yolov8s.yaml 1280 ddp ;;
quick)
  synth 640 2800 >/dev/null &
  synth 1280 720 >/dev/null &
  wait
  DATA=$work/data640/data.yaml SELECTIONS=off,all WARMUP=2 WINDOW=1 WORK=$work \
    bash "$here/plan_accuracy.sh" yolo11x.yaml 640 ddp
  python3 "$here/largest_batch_probe.py" "$OUT/ultralytics-largest-yolo11x-1280.json" yolo11x.yaml 1280 \
    | grep -v '"batch"\|fits\|peak_GiB\|[{}],\?$' || true
  DATA=$work/data1280/data.yaml SELECTIONS=all WARMUP=2 WINDOW=1 WORK=$work \
    bash "$here/plan_accuracy.sh" yolo11x.yaml 1280 ddp ;;
auto)
  data=$(synth 640 2800)
  for backend in ddp zero2 fsdp; do
    rm -rf "$work/auto-$backend"
    timeout 150 python3 -m yoloscale train model=yolo11x.yaml imgsz=640 batch=auto grad_ckpt=auto data="$data" \
      backend="$backend" epochs=1 val=False plots=False log_interval=2 workers=8 project="$work" name="auto-$backend" \
      >"$OUT/auto-$backend.log" 2>&1 || echo "auto $backend failed: $(tail -1 "$OUT/auto-$backend.log")"
    grep -h "batch=auto\|peak memory" "$OUT/auto-$backend.log" || true
  done ;;
sweep)
  WORK=$work bash "$here/sweep_packing.sh" 8 1,2,auto ;;
*) echo "unknown part $part"; exit 2 ;;
esac
