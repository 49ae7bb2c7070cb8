#!/usr/bin/env bash
# Where the time before the first optimizer step goes, ours beside Ultralytics': each trainer under cProfile for one
# short epoch (yolo11x by default) on the hard synthetic set, bytecode compiled beforehand for both.
# usage: OUT=DIR bash benchmarks/gpu/startup_profile.sh [MODEL] [IMGSZ]
set -u
OUT=${OUT:?set OUT}
model=${1:-yolo11x.yaml} imgsz=${2:-640}
work=${WORK:-/tmp/startup}
mkdir -p "$OUT" "$work"
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1
data=$work/data/data.yaml
[ -f "$data" ] || python3 -m yoloscale data synth out="$work/data" mode=hard train=320 val=64 size=$imgsz >/dev/null
common="data=$data imgsz=$imgsz epochs=1 batch=32 workers=14 cache=ram"
rm -rf "$work/runs"
python3 -m cProfile -o "$work/ours.prof" -m yoloscale train model=$model $common val=False plots=False \
  project="$work/runs" name=ours >"$work/ours.log" 2>&1
echo "ours rc=$?"; grep -a "first optimizer" "$work/ours.log" | tr '\r' '\n' | grep -a "first optimizer"
python3 -m cProfile -o "$work/ul.prof" -c "
import time, sys
from yoloscale.compat import offline_ultralytics_trainer
offline_ultralytics_trainer()
from ultralytics import YOLO
m = YOLO('$model')
first = []
m.add_callback('on_train_batch_end', lambda t: first or first.append(time.time()))
from yoloscale.training.run_log import seconds_since_start
m.train(data='$data', imgsz=$imgsz, epochs=1, batch=32, workers=14, cache='ram', val=False, plots=False,
        project='$work/runs', name='ul', device=0)
print('ultralytics first batch end %.1f s after the command started' % (seconds_since_start() - (time.time() - first[0])))
" >"$work/ul.log" 2>&1
echo "ul rc=$?"; tail -2 "$work/ul.log"
for side in ours ul; do
python3 - "$work/$side.prof" >"$OUT/$side-profile.txt" <<'PY'
import pstats, sys
s = pstats.Stats(sys.argv[1]); s.sort_stats("cumulative").print_stats(120)
PY
done
cp "$work"/*.log "$OUT/"
