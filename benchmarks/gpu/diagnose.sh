#!/usr/bin/env bash
# Where our whole run loses time against Ultralytics' on one GPU (docs/benchmarks.md): the step's kernels side by
# side (profile_step.py), the train loaders alone (loader_compare.py), a 3-epoch race of yolo11l at 512, and our
# same run under cProfile with Python's import timing.
# usage: OUT=DIR bash benchmarks/gpu/diagnose.sh [parts...]   parts: profile loader race cprofile (default: all)
set -u
OUT=${OUT:?set OUT}
work=${WORK:-/tmp/diag}
mkdir -p "$OUT" "$work"
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1
data=$work/data/data.yaml
[ -f "$data" ] || python3 -m yoloscale data synth out="$work/data" train=1600 val=200 size=640 >/dev/null
for part in ${@:-profile loader race cprofile}; do
  t0=$(date +%s)
  case $part in
  profile)
    for side in ultralytics yoloscale; do
      timeout 150 python3 benchmarks/gpu/profile_step.py $side "$OUT/profile" model=yolo11x.yaml data="$data" \
        imgsz=640 batch=32 workers=12 cache=ram >"$work/profile-$side.log" 2>&1
      echo "profile $side rc=$?"; tail -1 "$work/profile-$side.log"
    done ;;
  loader)
    timeout 90 python3 benchmarks/gpu/loader_compare.py "$data" 320 32 14 3 2>&1 | tail -1 | tee "$OUT/loader-320.json"
    MAIN_MS=20 timeout 90 python3 benchmarks/gpu/loader_compare.py "$data" 320 32 14 2 2>&1 | tail -1 | tee "$OUT/loader-320-main20.json" ;;
  race)
    rm -rf "$work/race"
    timeout 260 python3 -m yoloscale race model=yolo11l.yaml data="$data" imgsz=512 epochs=3 batch=32 workers=14 \
      cache=ram out="$work/race" 2>&1 | tail -15 | tee "$OUT/race.txt"
    cp "$work/race/race.json" "$OUT/" 2>/dev/null ;;
  cprofile)
    rm -rf "$work/runs"
    timeout 150 python3 -X importtime -m cProfile -o "$work/ours.prof" -m yoloscale train model=yolo11l.yaml \
      data="$data" imgsz=512 epochs=3 batch=32 workers=14 cache=ram project="$work/runs" name=cprof \
      >"$work/cprof.log" 2>"$work/importtime.txt"
    echo "cprofile rc=$?"
    python3 - "$work/ours.prof" >"$OUT/cprofile.txt" <<'PY'
import pstats, sys
s = pstats.Stats(sys.argv[1]); s.sort_stats("cumulative").print_stats(70); s.sort_stats("tottime").print_stats(30)
PY
    sort -t'|' -k2 -n -r "$work/importtime.txt" | head -60 >"$OUT/importtime-top.txt"
    grep -E "first optimizer|epoch|done" "$work/cprof.log" | tail -8
    cp "$work/runs/cprof/results.csv" "$OUT/cprof-results.csv" 2>/dev/null ;;
  esac
  echo "== $part took $(( $(date +%s) - t0 )) s"
done
cp "$work"/*.log "$work"/*.txt "$OUT/" 2>/dev/null
tar czf "$work/results.tgz" -C "$OUT" . && rm -rf "${OUT:?}"/* && mv "$work/results.tgz" "$OUT/" && ls -la "$OUT"
