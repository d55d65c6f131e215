#!/usr/bin/env bash
# The next GPU session's first call (the device tool, 10 minutes): the GPU test groups that
# session 13's call cut at 160 s (gated_deltanet's chunk tests, rwkv7's, gla / retnet /
# rwkv6's), split finer, in 8 parallel processes (their kernels compile on separate CPU
# cores; most of a group's time is compiling), then the profile of the ops not profiled
# since session 8 (rwkv7, rwkv6, retnet, mamba2, linear_attention) and of the delta rules
# after session 13's backward changes (the WY backward's single L^-T product, the gradient
# kernel at K tiles of 32; deltanet's forward+backward was 0.82x fla's before them).
# The test summary goes to $OUT/gpu_tests.txt, every log to $OUT/gpu_logs.tgz, the profile
# rows to $OUT/profile_chunk.json.
# Then: bench_chunk.py beside fla for kda, rwkv7, then gla, rwkv6, retnet, mamba2,
# linear_attention (fla autotunes 1-3 minutes per op and direction: two or three calls);
# then gpu_experiments.sh sweep.
# Usage: OUT=dir TEST_S=290 bash benchmarks/gpu_session.sh
set -u
cd "$(dirname "$0")"
F=tests/codegen/test_recurrent_gpu.py
OUT="$OUT" TEST_S="${TEST_S:-290}" bash gpu_tests.sh \
    "$F::chunk_gpu and gated_deltanet and fp32 and not wide and not long" \
    "$F::chunk_gpu and gated_deltanet and bf16 and not wide and not long" \
    "$F::chunk_gpu and rwkv7 and fp32 and not wide and not long" \
    "$F::chunk_gpu and rwkv7 and bf16 and not wide and not long" \
    "$F::chunk_gpu and (gla or retnet) and not long and not wide" \
    "$F::chunk_gpu and (rwkv6 or mamba2) and not long and not wide" \
    "$F::wide_heads and (gla or rwkv6 or retnet)" \
    "$F::chunk_gpu and (linear_attention or hgrn2 or rwkv5) and not long and not wide"
tar czf "$OUT/gpu_logs.tgz" -C /tmp gpu_logs
timeout 100 python profile_chunk.py --out "$OUT" --ops deltanet,gated_deltanet,kda
# the gradient kernel at session 13's first K tiles (64), for the comparison
timeout 60 python profile_chunk.py --out "$OUT" --ops gated_deltanet --set delta_grads.BK=64
timeout 150 python profile_chunk.py --out "$OUT" --ops gla,rwkv7,rwkv6,retnet,mamba2,linear_attention
# the scalar and diagonal decays' gradient kernel at its K tiles before session 13's end (64)
timeout 60 python profile_chunk.py --out "$OUT" --ops gla,mamba2 --set grads.BK=64
