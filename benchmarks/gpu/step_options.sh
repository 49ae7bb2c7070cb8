#!/usr/bin/env bash
# Do the speed options pay? `yoloscale bench` of our loop, eager against each option in the same run (one process
# per measurement), for one case: s320 (yolov8s, 320 px) or x640 (yolo11x, 640 px), batch 32, fp16.
# usage: OUT=DIR bash benchmarks/gpu/step_options.sh CASE [VARIANTS]   (VARIANTS as bench's variants=, ';'-separated)
set -u
OUT=${OUT:?set OUT}
case=$1
work=${WORK:-/tmp/stepopt}
mkdir -p "$OUT" "$work"
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1
case $case in
  s320) model=yolov8s.yaml imgsz=320 n=1280 workers=14 ;;
  l512) model=yolo11l.yaml imgsz=512 n=960 workers=14 ;;
  x640) model=yolo11x.yaml imgsz=640 n=768 workers=12 ;;
esac
variants=${2:-"compile=True compile_scope=model;fused_bn_silu=True"}
data=$work/data-$imgsz/data.yaml
[ -f "$data" ] || python3 -m yoloscale data synth out="$work/data-$imgsz" train=$n val=8 size=$imgsz >/dev/null
t0=$(date +%s)
timeout ${LIMIT:-420} python3 -m yoloscale bench model=$model imgsz=$imgsz batch=32 workers=$workers cache=ram \
  data="$data" precisions=fp16 skip=ultralytics,loader warmup=${WARMUP:-8} window=${WINDOW:-4} \
  variants="$variants" out="$work/bench-$case" >"$work/bench-$case.txt" 2>&1
echo "bench $case rc=$? in $(( $(date +%s) - t0 )) s"
grep -E "img/s|yoloscale|bare|Error|error" "$work/bench-$case.txt" | tail -20
mkdir -p "$OUT/$case" && cp "$work/bench-$case.txt" "$work/bench-$case"/*.json "$OUT/$case/" 2>/dev/null
cp "$work/bench-$case"/*.log "$OUT/$case/" 2>/dev/null
python3 - "$work/bench-$case" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("loop-*.json")):
    d = json.loads(f.read_text())
    if "loop" in d:
        print(f.stem, "loop", round(d["loop"]["img_s"], 1), "bare", round(d["bare"]["img_s"], 1),
              "first_step_s", round(d["loop"]["first_step_s"], 1), "peak", round(d["loop"].get("peak_GiB") or 0, 1))
PY
