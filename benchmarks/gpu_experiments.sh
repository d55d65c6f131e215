#!/usr/bin/env bash
# The delta rules' experiment switches, profiled on the GPU (one device call, ~5 minutes):
# per op, the forward and forward+backward wall time and every kernel's CUDA time
# (profile_chunk.py) with the defaults, with the diagonal-blocks inverse (WY_INVERSE=1),
# with W and the no-gradient chunk states in bf16 (DELTA_HALF_BUFFERS=1), and both; then
# the WY and delta state kernels' launch sweep, and the parallel forward's. Results: $OUT/profile_chunk.json (a row per
# op, direction and setting) and $OUT/sweep_chunk_launch.jsonl.
# Usage: OUT=dir bash benchmarks/gpu_experiments.sh [ops]
set -u
cd "$(dirname "$0")"
OPS="${1:-gated_deltanet,kda,rwkv7}"
for s in "" "--set WY_INVERSE=1" "--set DELTA_HALF_BUFFERS=1" \
         "--set WY_INVERSE=1 --set DELTA_HALF_BUFFERS=1"; do
    # shellcheck disable=SC2086
    python profile_chunk.py --out "$OUT" --ops "$OPS" $s
done
python sweep_chunk_launch.py --out "$OUT" --ops gated_deltanet \
    --kernels wy,delta_states,delta_dstates
# the causal parallel form's forward with whole K and V tiles (then bench_forms.py again)
python sweep_chunk_launch.py --out "$OUT" --ops retnet,linear_attention \
    --kernels parallel_output
