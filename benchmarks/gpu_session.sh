#!/usr/bin/env bash
# The next GPU session's first call (the device tool, 10 minutes): the GPU tests of the
# kernels changed since they last ran on a GPU, in 8 parallel processes (their kernels
# compile on separate CPU cores), then the delta rules' profile with the new defaults of
# session 11 (the inverse through memory, L^-1 kept for the backward, the WY backward by K
# blocks, chunk_local_du_kernel, bf16 W, states and state gradients) and with the inverse
# timed before (WY_INVERSE=0), and the ordered delta kernels as session 11 left them.
# The test summary goes to $OUT/gpu_tests.txt, every log to $OUT/gpu_logs.tgz, the profile
# rows to $OUT/profile_chunk.json.
# Then one call each: gpu_experiments.sh profile, gpu_experiments.sh sweep, then parallel.
# Later: bench_chunk.py (every op beside fla; fla autotunes 1-3 minutes per op and
# direction), bench_forms.py --lengths 16,32,64,128,256 (the recurrent/chunk crossover).
# Usage: OUT=dir TEST_S=290 bash benchmarks/gpu_session.sh
set -u
cd "$(dirname "$0")"
F=tests/codegen/test_recurrent_gpu.py
OUT="$OUT" TEST_S="${TEST_S:-290}" bash gpu_tests.sh \
    "$F::chunk_gpu and deltanet and not gated and not wide and not long" \
    "$F::chunk_gpu and gated_deltanet and not wide and not long" \
    "$F::chunk_gpu and kda and not wide and not long" \
    "$F::chunk_gpu and rwkv7 and not wide and not long" \
    "$F::long and (deltanet or kda or rwkv7)" \
    "$F::wide_heads and (gated_deltanet or kda or rwkv7)" \
    "$F::parallel_gpu and mamba2" \
    "$F::chunk_gpu and (gla or retnet or rwkv6) and not long and not wide"
tar czf "$OUT/gpu_logs.tgz" -C /tmp gpu_logs
timeout 150 python profile_chunk.py --out "$OUT" --ops gated_deltanet,deltanet,kda,gla
# the ordered delta kernels as session 11 left them (tf32 operands, 8 warps, no stages)
timeout 60 python profile_chunk.py --out "$OUT" --ops gated_deltanet \
    --set DELTA_ORDERED_HALF_DOT=1 --set delta_states.num_stages=1
timeout 50 python profile_chunk.py --out "$OUT" --ops gated_deltanet --set WY_INVERSE=0
# diagonal decays' ordered kernels on predecayed keys and queries (session 13) and without
timeout 90 python profile_chunk.py --out "$OUT" --ops gla,kda --set PREDECAY=0
