#!/usr/bin/env bash
# On a GPU machine without Slurm, 1 or more GPUs (docs/launch.md, "Recorded on GPUs"): doctor's output; DeepSpeed's own launcher
# (`deepspeed --num_gpus N --module yoloscale train ... --deepspeed ds_configs/zero2.json`); `accelerate launch`
# (2+ GPUs); `doctor bench=True` (2+ GPUs); the generic
# launch/slurm DeepSpeed template run with stand-in srun/scontrol (node 0 of 1) training backend=zero3; then
# export of that ZeRO-3 run and Ultralytics' own validation of its best.pt.
# usage: benchmarks/gpu/check_launchers.sh OUT_DIR
set -u
out=$1
mkdir -p "$out/bin"
gpus=$(nvidia-smi -L | wc -l)
bench=(); [ "$gpus" -gt 1 ] && bench=(bench=True)
{ python -m yoloscale doctor "${bench[@]}"; echo "--- doctor export=True"; python -m yoloscale doctor export=True; } >"$out/doctor.txt" 2>&1
python -m yoloscale data synth out="$out/data" train=128 val=32 size=160 >/dev/null
small=(model=yolov8n.yaml "data=$out/data/data.yaml" imgsz=160 batch=16 epochs=2 close_mosaic=0 workers=2 "project=$out")

# 1. DeepSpeed's launcher, ZeRO-2 from the shipped JSON
python -m deepspeed.launcher.runner --num_gpus "$gpus" --module yoloscale train "${small[@]}" name=ds-zero2 \
    --deepspeed ds_configs/zero2.json >"$out/ds-zero2.txt" 2>&1
echo "deepspeed --num_gpus $gpus --module (zero2): rc=$?"

# 1b. accelerate launch, DDP
if [ "$gpus" -gt 1 ]; then
    python -m accelerate.commands.launch --multi_gpu --num_processes "$gpus" -m yoloscale train "${small[@]}" \
        name=acc-ddp >"$out/acc-ddp.txt" 2>&1
    echo "accelerate launch --multi_gpu --num_processes $gpus: rc=$?"
fi

# 2. launch/slurm/deepspeed.sbatch-style template, stand-in srun/scontrol, ZeRO-3
python -m yoloscale launch slurm generic=True launcher=deepspeed nodes=1 gpus_per_node="$gpus" >"$out/t.sbatch"
printf '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n' >"$out/bin/srun"
printf '#!/bin/bash\necho localhost\n' >"$out/bin/scontrol"
chmod +x "$out/bin/srun" "$out/bin/scontrol"
PATH="$out/bin:$PATH" SLURM_JOB_ID=777 SLURM_JOB_NODELIST=localhost SLURM_JOB_NUM_NODES=1 SLURM_SUBMIT_DIR="$out" \
    bash "$out/t.sbatch" "${small[@]}" backend=zero3 name=tmpl-zero3 >"$out/tmpl-zero3.txt" 2>&1
echo "deepspeed template (zero3): rc=$?"

# 3. export + Ultralytics' own validation of the ZeRO-3 run's best.pt
python -m yoloscale export "$out/tmpl-zero3" >"$out/export.txt" 2>&1
echo "export: rc=$?"
python - "$out" <<'PY' 2>&1 | tail -3
import sys
from ultralytics import YOLO
out = sys.argv[1]
m = YOLO(f"{out}/tmpl-zero3/weights/best.pt")
r = m.val(data=f"{out}/data/data.yaml", imgsz=160, batch=16, verbose=False, plots=False)
print(f"Ultralytics val of the ZeRO-3 best.pt: mAP50 {r.box.map50:.3f}")
PY
for f in ds-zero2 acc-ddp tmpl-zero3; do [ -f "$out/$f.txt" ] || continue; echo "== $f"; grep -E "yoloscale: |mAP50|done:|rror" "$out/$f.txt" | cut -c1-300 | tail -6; done
cat "$out/doctor.txt"
