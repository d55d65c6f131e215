#!/usr/bin/env bash
# The experiment switches, on the GPU.
# Part "profile" (~5 minutes): per delta op, the forward and forward+backward wall time,
# every kernel's CUDA time and the peak memory (profile_chunk.py) with the defaults, with
# W and the chunk states in fp32 (DELTA_HALF_BUFFERS=0, the default until session 11), with
# bf16 dots in every delta kernel as fla's (DELTA_HALF_DOT=0: the tf32 ones of the WY,
# output and gradient kernels are the candidates for deltanet's backward, 0.82x fla's in
# session 13), and with the ordered kernels on in-kernel decays (PREDECAY=0), each with its
# differences from the recurrent form's output and gradients (the accuracy it costs). Part "sweep" (~6 minutes): the
# launch sweep of the WY (forward, backward) and delta state kernels and of the gradient
# kernel of mamba2 and rwkv6. Part "parallel" (~4 minutes): the parallel form's kernels.
# Results: $OUT/profile_chunk.json (a row per op, direction and setting) and
# $OUT/sweep_chunk_launch.jsonl (rows appended as they come: a cut run keeps them).
# Usage: OUT=dir bash benchmarks/gpu_experiments.sh profile|sweep|parallel [ops]
set -u
cd "$(dirname "$0")"
PART="${1:-profile}"
OPS="${2:-gated_deltanet,kda,rwkv7}"
if [ "$PART" = profile ]; then
# (WY_INVERSE=0 and the ordered kernels of session 11 were timed in session 13: slower)
for s in "" "--set DELTA_HALF_BUFFERS=0" "--set DELTA_HALF_DOT=0" "--set PREDECAY=0"; do
    # shellcheck disable=SC2086
    python profile_chunk.py --out "$OUT" --ops "$OPS" $s
done
fi
if [ "$PART" = sweep ]; then
python sweep_chunk_launch.py --out "$OUT" --ops gated_deltanet \
    --kernels wy,wy_bwd,delta_states,delta_dstates
# the gradient kernel, the largest of the scalar and diagonal decays' backward, spills
# 0.4-0.5 KB per thread for mamba2 and rwkv6 at its default tiles (preflight, sm_90)
python sweep_chunk_launch.py --out "$OUT" --ops mamba2,rwkv6 --kernels grads
fi
if [ "$PART" = parallel ]; then
# the causal parallel form's kernels with whole K and V tiles (then bench_forms.py again)
python sweep_chunk_launch.py --out "$OUT" --ops retnet,linear_attention \
    --kernels parallel_output,parallel_grads
fi
