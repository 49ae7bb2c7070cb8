#!/usr/bin/env bash
# The race panel on one GPU (docs/benchmarks.md): yoloscale race panel=default on the hard synthetic set, one case per
# call so that each fits a 10-minute machine call. Run from the repository root:
#   OUT=/path bash benchmarks/gpu/race_panel.sh CASE [repeats]     CASE: x640 l512 s320
# Writes OUT/panel-CASE.json, OUT/race-CASE-SEED.json and the table; the runs stay in the machine's scratch folder.
set -euo pipefail
OUT=${OUT:?set OUT to an output folder}
case=${1:?give a case: x640 l512 s320}
repeats=${2:-1}
work=${WORK:-/tmp/panel-work}
mkdir -p "$OUT" "$work"
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1
# bytecode compiled before either side runs: otherwise the first side pays for compiling what both import
python3 -m compileall -q -j 8 "$(python3 -c 'import ultralytics, pathlib; print(pathlib.Path(ultralytics.__file__).parent)')" \
  yoloscale >/dev/null 2>&1 || true
data=$work/data/data.yaml
[ -f "$data" ] || python3 -m yoloscale data synth out="$work/data" mode=hard train=1600 val=320 size=640 >/dev/null
python3 - "$case" >"$work/panel-$case.yaml" <<'PY'
import sys, yaml
from yoloscale.commands.race_panel import DEFAULT
case = [c for c in DEFAULT["cases"] if c["name"] == sys.argv[1]]
print(yaml.safe_dump({**DEFAULT, "cases": case}))
PY
rm -rf "$work/$case"
python3 -m yoloscale race panel="$work/panel-$case.yaml" repeats="$repeats" data="$data" gpus=1 out="$work/$case" \
  | tee "$OUT/panel-$case.txt"
cp "$work/$case/panel.json" "$OUT/panel-$case.json"
for d in "$work/$case"/"$case"-*; do cp "$d/race.json" "$OUT/race-$(basename "$d").json"; done
