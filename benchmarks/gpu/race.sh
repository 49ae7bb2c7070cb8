#!/usr/bin/env bash
# The race on one GPU, as docs/benchmarks.md reports it: yolo11x at 640 px (both trainers at their defaults), a small
# model at 320 px, and our side again without cuDNN autotuning. Run on a GPU machine from the repository root:
#   OUT=/path bash benchmarks/gpu/race.sh [which...]     which: x640 small320 x640-nobench (default: all three)
# Each race writes OUT/race-<which>.json (+ .png); the logs stay in the machine's scratch folder.
set -euo pipefail
OUT=${OUT:?set OUT to an output folder}
work=${WORK:-/tmp/race-work}
mkdir -p "$OUT" "$work"
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1
data=$work/data/data.yaml
[ -f "$data" ] || python3 -m yoloscale data synth out="$work/data" train=1600 val=200 size=640
common=(data="$data" epochs=6 workers=14 cache=ram gpus=1)
run() {  # name, then race settings
  local name=$1; shift
  rm -rf "$work/$name"
  python3 -m yoloscale race "${common[@]}" "$@" out="$work/$name" | tee -a "$OUT/race.txt"
  cp "$work/$name/race.json" "$OUT/race-$name.json"
  [ -f "$work/$name/race.png" ] && cp "$work/$name/race.png" "$OUT/race-$name.png"
}
for which in ${@:-x640 small320 x640-nobench}; do
  case $which in
    x640) run x640 model=yolo11x.yaml imgsz=640 batch=32 ;;
    small320) run small320 model=yolov8s.yaml imgsz=320 batch=32 epochs=10 ;;
    x640-nobench) run x640-nobench model=yolo11x.yaml imgsz=640 batch=32 sides=yoloscale cudnn_benchmark=False ;;
  esac
done
