#!/usr/bin/env bash
# One device call: bench_chunk.py beside fla with fla's compiling taken off the clock.
# First, one process per op calls fla's ops once (bench_chunk.py --warm-fla), in parallel:
# fla autotunes 1-3 minutes per op and direction on a fresh machine, most of it compiling
# its candidates one after another; in parallel they land in Triton's cache on all CPU
# cores at once. TESTS=1 runs the chunk GPU test groups beside them (gpu_tests.sh; their
# kernels compile on the same cores). The warm processes keep fla's autotuning choices to
# themselves (FLA_CACHE_RESULTS=0): made under contention, they would be noise.
# Then the timed run (one process, alone on the GPU):
# fla autotunes again, on cached binaries, and the timing is as in a plain bench_chunk.py
# run; linforge's first call there is a cold one (its benchmark shapes are not warmed).
# Usage: OUT=dir OPS=a,b WARM_OPS=a,b,c TESTS=1 WARM_S=240 BENCH_S=330 bash gpu_bench.sh
set -u
cd "$(dirname "$0")"
OPS="${OPS:-deltanet,kda,rwkv7,gated_deltanet}"
WARM_OPS="${WARM_OPS:-$OPS}"
mkdir -p "$OUT/warm"
for op in ${WARM_OPS//,/ }; do
    FLA_CACHE_RESULTS=0 timeout "${WARM_S:-240}" python bench_chunk.py --warm-fla --ops "$op" \
        > "$OUT/warm/$op.log" 2>&1 &
done
if [ "${TESTS:-0}" = 1 ]; then
    F=tests/codegen/test_recurrent_gpu.py
    OUT="$OUT" TEST_S="${WARM_S:-240}" bash gpu_tests.sh \
        "$F::chunk_gpu and deltanet and not gated and not wide and not long" \
        "$F::chunk_gpu and gated_deltanet and fp32 and not wide and not long" \
        "$F::chunk_gpu and gated_deltanet and bf16 and not wide and not long" \
        "$F::chunk_gpu and kda and not wide and not long" \
        "$F::chunk_gpu and rwkv7 and fp32 and not wide and not long" \
        "$F::chunk_gpu and rwkv7 and bf16 and not wide and not long" \
        "$F::chunk_gpu and (gla or retnet) and not long and not wide" \
        "$F::chunk_gpu and (rwkv6 or mamba2) and not long and not wide" \
        "$F::wide_heads" \
        "$F::chunk_gpu and (linear_attention or hgrn2 or rwkv5) and not long and not wide" &
fi
wait
cat "$OUT"/warm/*.log
[ "${TESTS:-0}" = 1 ] && tar czf "$OUT/gpu_logs.tgz" -C /tmp gpu_logs
timeout "${BENCH_S:-330}" python bench_chunk.py --out "$OUT" --ops "$OPS"
