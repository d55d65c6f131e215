#!/usr/bin/env bash
# The next GPU session's first call (the device tool, 10 minutes): the GPU tests of the
# kernels changed since they last ran on a GPU, in 9 parallel processes (their kernels
# compile on separate CPU cores). On 2026-12-05 a run of 14 processes lost its machine
# at the end of its 560 s (cause unknown), so the groups are fewer and larger now.
# The summary goes to $OUT/gpu_tests.txt, every log to $OUT/gpu_logs.tgz.
# Then one call each: gpu_experiments.sh profile, gpu_experiments.sh sweep, then parallel.
# Later: bench_chunk.py (every op beside fla; fla autotunes 1-3 minutes per op and
# direction; not measured since session 8: kda, rwkv7, linear_attention, mamba2 after its
# host-time cut), bench_forms.py --lengths 16,32,64,128,256 (the recurrent/chunk crossover).
# Usage: OUT=dir TEST_S=480 bash benchmarks/gpu_session.sh
set -u
cd "$(dirname "$0")"
F=tests/codegen/test_recurrent_gpu.py
OUT="$OUT" TEST_S="${TEST_S:-480}" bash gpu_tests.sh \
    "$F::chunk_gpu and (deltanet or kda or rwkv7) and not long" \
    "$F::chunk_gpu and (linear_attention or mlstm or performer)" \
    "$F::chunk_gpu and (cosformer or gated_rfa or based)" \
    "$F::chunk_gpu and (retnet or mamba2 or lightning) and not long" \
    "$F::chunk_gpu and (gla or rwkv6 or hgrn2 or rwkv5) and not long" \
    "$F::wide_heads or steep" \
    "$F::long and (deltanet or kda or rwkv7)" \
    "$F::parallel_gpu and (linear_attention or retnet or mamba2)" \
    "$F::parallel_gpu and (mlstm or gla or rwkv6)"
tar czf "$OUT/gpu_logs.tgz" -C /tmp gpu_logs
