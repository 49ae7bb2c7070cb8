#!/usr/bin/env bash
# Backend x precision x grad_ckpt x resolution table for docs/backends.md: one process per backend
# (benchmarks/gpu/backend_matrix.py says what it measures and how).
# usage: benchmarks/gpu/measure_matrix.sh OUT GPUS "BACKEND SPEC... [--profile SPEC]" ["BACKEND SPEC..." ...]
#   e.g. benchmarks/gpu/measure_matrix.sh /tmp/m 2 "ddp bf16:off:640:32:loop bf16:all:640:32" "fsdp bf16:off:640:32:loop"
# MATRIX_TIMEOUT (s, default 400) bounds each backend's process; a dead rank stops the other after 180 s.
set -u
out=$1
gpus=$2
shift 2
mkdir -p "$out"
here=$(dirname "$0")
[ -f "$out/d640/data.yaml" ] || python -m yoloscale data synth out="$out/d640" train=1152 val=8 size=640 >/dev/null
[ -f "$out/d1280/data.yaml" ] || python -m yoloscale data synth out="$out/d1280" train=32 val=8 size=1280 >/dev/null
for job in "$@"; do
    read -r backend specs <<<"$job"
    tag=${backend//[,=]/-}  # "fsdp,reshard_after_forward=False": a backend with settings
    # shellcheck disable=SC2086  # the specs are words
    timeout "${MATRIX_TIMEOUT:-400}" python -m torch.distributed.run --standalone \
        --nproc_per_node "$gpus" "$here/gpu_backend_matrix.py" "$out" "$backend" "$out/d640/data.yaml" \
        "$out/d1280/data.yaml" $specs >"$out/matrix-$tag.log" 2>&1
    echo "== $backend exit $? ($(date +%T))"
    grep -h '^{' "$out/matrix-$tag.log" | cut -c1-400
done
