#!/usr/bin/env bash
# One short GPU session (the device tool): the chunked benchmark beside fla, then the chunked
# form's GPU tests in parallel processes (their kernels compile on separate CPU cores).
# Usage: OUT=dir BENCH_OPS=retnet,mamba2,gla FWD_ONLY=gla bash benchmarks/gpu_session.sh
set -u
cd "$(dirname "$0")"
timeout "${BENCH_S:-250}" python bench_chunk.py --out "$OUT" --ops "${BENCH_OPS:-retnet,mamba2,gla}" \
    --forward-only "${FWD_ONLY:-gla}" 2>&1 | grep -v -i warn | tail -14
cd ..
i=0
for sel in "retnet or mamba2 or lightning" "gla" "linear_attention or mlstm or performer" \
           "rwkv6 or hgrn2"; do
    i=$((i + 1))
    timeout "${TEST_S:-110}" python -m pytest -q -n 0 -m gpu tests/codegen/test_recurrent_gpu.py \
        -k "chunk_gpu and ($sel) and not long" > "$OUT/gpu_tests_$i.txt" 2>&1 &
done
wait
tail -n 4 "$OUT"/gpu_tests_*.txt
