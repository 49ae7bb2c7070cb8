#!/usr/bin/env bash
# Trials side by side on one GPU: the same sweep of short trials (yolov8s, 320 px, 400 images, pruner off) with one,
# two and `auto` trials per GPU. Run from the repository root:
#   OUT=/path bash benchmarks/gpu/sweep_packing.sh [TRIALS] [MODES]      e.g. 8 1,2,auto
# Prints, per mode, the wall-clock, trials per hour and the mean steady epoch time of its trials; writes
# OUT/sweep-packing.json and each mode's sweep.csv and console output. MODEL, IMGSZ, EPOCHS, N_TRAIN and BATCH change
# the trials (a dry run on the CPU: MODEL=yolov8n.yaml IMGSZ=64 N_TRAIN=32 EPOCHS=3 BATCH=8).
set -euo pipefail
OUT=${OUT:?set OUT to an output folder}
trials=${1:-8}
modes=${2:-1,2,auto}
epochs=${EPOCHS:-4}
work=${WORK:-/tmp/sweep-work}
mkdir -p "$OUT" "$work"
rm -f "$work/times.txt"
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1 YOLOSCALE_CACHE="$work/cache"
data=$work/data/data.yaml
[ -f "$data" ] || python3 -m yoloscale data synth out="$work/data" mode=hard train="${N_TRAIN:-400}" val=80 size="${IMGSZ:-320}" >/dev/null
cat >"$work/space.yaml" <<'YAML'
lr0: {type: float, low: 0.002, high: 0.02, log: true}
fliplr: [0.0, 0.5]
YAML
for mode in ${modes//,/ }; do
  rm -rf "$work/sweep-$mode"
  start=$(date +%s.%N)
  python3 -m yoloscale sweep "$work/space.yaml" model="${MODEL:-yolov8s.yaml}" data="$data" imgsz="${IMGSZ:-320}" epochs="$epochs" \
    batch="${BATCH:-32}" \
    optimizer=SGD pruner=none sampler=random trials="$trials" trials_per_gpu="$mode" out="$work/sweep-$mode" \
    >"$OUT/sweep-$mode.txt" 2>&1 || echo "mode $mode failed: $(tail -1 "$OUT/sweep-$mode.txt")"
  echo "$mode $start $(date +%s.%N)" >>"$work/times.txt"
  cp "$work/sweep-$mode/sweep.csv" "$OUT/sweep-$mode.csv" 2>/dev/null || true
done
python3 - "$work" "$OUT" "$epochs" <<'PY'
import csv, glob, json, statistics, sys
work, out, n_epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = []
for line in open(f"{work}/times.txt"):
    mode, start, end = line.split()
    wall = float(end) - float(start)
    epochs, done = [], 0
    for path in glob.glob(f"{work}/sweep-{mode}/trials/*/results.csv"):
        t = [float(r["time"]) for r in csv.DictReader(open(path))]
        done += len(t) == n_epochs
        epochs += [b - a for a, b in zip(t[1:], t[2:])]  # steady epochs: the first (start-up, warm-up) left out
    rows.append({"trials_per_gpu": mode, "wall_s": wall, "finished": done, "trials_per_hour": done * 3600 / wall,
                 "epoch_s": statistics.mean(epochs) if epochs else None})
one = next((r for r in rows if r["trials_per_gpu"] == "1"), None)
print(f"{'trials/GPU':<11}{'wall s':>8}{'finished':>9}{'trials/h':>10}{'x one':>7}{'epoch s':>9}{'x one':>7}")
for r in rows:
    x = r["trials_per_hour"] / one["trials_per_hour"] if one and one["trials_per_hour"] else float("nan")
    e = r["epoch_s"] / one["epoch_s"] if one and one["epoch_s"] and r["epoch_s"] else float("nan")
    print(f"{r['trials_per_gpu']:<11}{r['wall_s']:>8.1f}{r['finished']:>9}{r['trials_per_hour']:>10.1f}{x:>7.2f}"
          f"{(r['epoch_s'] or float('nan')):>9.2f}{e:>7.2f}")
json.dump(rows, open(f"{out}/sweep-packing.json", "w"), indent=1)
PY
