#!/usr/bin/env bash
# Effect of compile=True on one GPU (docs/benchmarks.md): the same `yoloscale bench` loop measurement with and
# without torch.compile, yolo11x at 640, batch 32, 12 workers, cache=ram, synthetic data.
# usage: [COMPILE="False True"] [WARMUP=10 WINDOW=8] benchmarks/gpu/measure_compile.sh OUT_DIR [PRECISIONS] (default fp16)
set -u
out=$1
precisions=${2:-fp16}
mkdir -p "$out"
python -m yoloscale data synth out="$out/data" train=1120 val=8 size=640 >/dev/null
common=(model=yolo11x.yaml imgsz=640 batch=32 workers=12 cache=ram "data=$out/data/data.yaml")
for compile in ${COMPILE:-False True}; do
    python -m yoloscale bench "${common[@]}" "compile=$compile" precisions="$precisions" \
        skip=ultralytics,loader warmup="${WARMUP:-10}" window="${WINDOW:-8}" out="$out/compile-$compile" >"$out/compile-$compile.txt" 2>&1
    echo "== compile=$compile"
    grep -E "yoloscale (loop|bare)|FAILED|Error" "$out/compile-$compile.txt"
    ls -l --time-style=+%T "$out/compile-$compile"/*.log
    python - "$out/compile-$compile" <<'PY'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    d = json.loads(f.read_text())
    if isinstance(d, dict) and "loop" in d:
        print(f.name, "first_step_s", round(d["loop"].get("first_step_s", -1), 1))
PY
done
