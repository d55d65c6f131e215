#!/usr/bin/env bash
# The next GPU session's first call (the device tool, 10 minutes): the chunked GPU tests of
# the kernels that have not run on a GPU yet, in 14 parallel processes (their kernels compile
# on separate CPU cores; the causal parallel tests as one group ran past 9 minutes on an
# H200 on 2026-12-05, so they are two groups now); the summary
# in $OUT/gpu_tests.txt and every log in $OUT/gpu_logs.tgz (a call brings back 8 files at
# most). Then, in later calls: bench_chunk.py (every op beside fla; fla autotunes 1-3 minutes
# per op and direction; not measured since session 8: kda, rwkv7, linear_attention, mamba2
# after its host-time cut), sweep_chunk_launch.py for delta_states / delta_dstates,
# bench_forms.py (the forms' crossovers beside SDPA).
# Usage: OUT=dir TEST_S=520 bash benchmarks/gpu_session.sh
set -u
cd "$(dirname "$0")"
F=tests/codegen/test_recurrent_gpu.py
OUT="$OUT" TEST_S="${TEST_S:-520}" bash gpu_tests.sh \
    "$F::chunk_gpu and deltanet and not long" \
    "$F::chunk_gpu and kda and not long" \
    "$F::chunk_gpu and rwkv7 and not long" \
    "$F::chunk_gpu and linear_attention" \
    "$F::chunk_gpu and (mlstm or performer)" \
    "$F::chunk_gpu and (cosformer or gated_rfa)" \
    "$F::chunk_gpu and based" \
    "$F::chunk_gpu and (retnet or mamba2 or lightning) and not long" \
    "$F::chunk_gpu and gla and not long" \
    "$F::wide_heads" \
    "$F::long and (deltanet or kda or rwkv7)" \
    "$F::parallel_gpu and (linear_attention or retnet or mamba2)" \
    "$F::parallel_gpu and (mlstm or gla or rwkv6)" \
    "$F::(chunk_gpu and (rwkv6 or hgrn2 or rwkv5)) or steep"
tar czf "$OUT/gpu_logs.tgz" -C /tmp gpu_logs
