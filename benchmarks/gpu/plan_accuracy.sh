#!/usr/bin/env bash
# The planner against real runs on one GPU: `yoloscale plan` predicts, for grad_ckpt off/highres/all and each backend
# one GPU runs, the largest per-device batch that fits and its peak and img/s; `yoloscale bench` then trains each row
# at that batch (our loop, fp16, synthetic data) and reports the real steady img/s and peak. Run from the repository
# root:   OUT=/path bash benchmarks/gpu/plan_accuracy.sh MODEL IMGSZ [BACKENDS]     e.g. yolo11x.yaml 1280 ddp,fsdp
# Writes OUT/plan-MODEL-IMGSZ.json (the predictions), OUT/real-MODEL-IMGSZ-BACKEND-GRADCKPT.json and a table.
# DATA=data.yaml: one data set for every row (enough images for (WARMUP + 3 x WINDOW + 1) steps of the largest batch);
# without it, bench writes a synthetic set per row. WARMUP/WINDOW: bench's (default 3 and 2). SELECTIONS: the
# grad_ckpt rows (default off,highres,all).
# A dry run on the CPU: PRECISION=fp32 PLAN_ARGS="gpu_memory=2GiB" BENCH_ARGS="epochs=1" (the script's logic).
set -euo pipefail
OUT=${OUT:?set OUT to an output folder}
model=${1:?give a model YAML}
imgsz=${2:?give an image size}
backends=${3:-ddp}
work=${WORK:-/tmp/plan-work}
tag="$(basename "$model" .yaml)-$imgsz"
mkdir -p "$OUT" "$work"
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1 YOLOSCALE_CACHE="$work/cache" PRECISION=${PRECISION:-fp16}
python3 -m yoloscale plan model="$model" imgsz="$imgsz" backends="$backends" selections="${SELECTIONS:-off,highres,all}" \
  json="$OUT/plan-$tag.json" ${PLAN_ARGS:-} | tee "$OUT/plan-$tag.txt"
python3 - "$OUT/plan-$tag.json" >"$work/rows-$tag.txt" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    print(r["backend"], r["grad_ckpt"], r["device_batch"])
PY
while read -r backend ckpt batch; do
  [ "$batch" -ge 1 ] || continue
  name="$tag-$backend-$ckpt"
  python3 -m yoloscale bench model="$model" imgsz="$imgsz" batch="$batch" backend="$backend" grad_ckpt="$ckpt" \
    precisions="$PRECISION" skip=ultralytics,loader warmup="${WARMUP:-3}" window="${WINDOW:-2}" workers=8 \
    ${DATA:+data="$DATA"} out="$work/$name" ${BENCH_ARGS:-} \
    >"$work/$name.log" 2>&1 \
    || echo "$name failed: $(tail -1 "$work/$name.log")"
  [ -f "$work/$name/bench.json" ] && cp "$work/$name/bench.json" "$OUT/real-$name.json"
done <"$work/rows-$tag.txt"
python3 - "$OUT" "$tag" <<'PY'
import glob, json, os, sys
out, tag = sys.argv[1], sys.argv[2]
plan = json.load(open(f"{out}/plan-{tag}.json"))
# real: the loop's reserved peak; img/s of the bare step (what the plan predicts: no data loading) and of the loop
print(f"{'backend':<8}{'grad_ckpt':<10}{'batch':>6}{'pred GiB':>10}{'real GiB':>10}{'ratio':>7}"
      f"{'pred img/s':>12}{'bare img/s':>12}{'ratio':>7}{'loop img/s':>12}")
for r in plan["rows"]:
    path = f"{out}/real-{tag}-{r['backend']}-{r['grad_ckpt']}.json"
    real = {}
    if os.path.exists(path):
        rows = json.load(open(path)).get("rows", [])
        of = lambda part: next((x for x in rows if x.get("what") == f"yoloscale {part} {os.environ['PRECISION']}"), {})
        real = {"img_s": of("bare").get("img_s"), "loop": of("loop").get("img_s"), "peak": of("loop").get("peak_GiB")}
    fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"
    ratio = lambda a, b: format(a / b, ".2f") if isinstance(b, (int, float)) and b else "-"
    print(f"{r['backend']:<8}{r['grad_ckpt']:<10}{r['device_batch']:>6}{r['peak'] / 2**30:>10.1f}"
          f"{fmt(real.get('peak'), '.1f'):>10}{ratio(r['peak'] / 2**30, real.get('peak')):>7}{r['img_s']:>12.1f}"
          f"{fmt(real.get('img_s'), '.1f'):>12}{ratio(r['img_s'], real.get('img_s')):>7}{fmt(real.get('loop'), '.1f'):>12}")
PY
