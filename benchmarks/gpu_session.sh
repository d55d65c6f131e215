#!/usr/bin/env bash
# The next GPU session's calls (the device tool: 10 minutes a call, 30 a session).
# Call 1 (PART=1): fla's candidates compiled for all nine ops in parallel with the chunk
# GPU test groups (gpu_bench.sh, TESTS=1), then the delta rules timed beside fla with each
# side's GPU and host time: session 14's bf16 dots of operands that are bf16 already
# (`_mm_of_loaded`: the output kernel, the in-chunk scores, the gradient kernel's state
# dots) are compiled for sm_90 and CPU-tested but not yet timed.
# Call 2 (PART=2), on the same warm machine: the scalar and diagonal decays beside fla
# (fla's binaries cached by call 1), then the profile of every op, ours and fla's.
# Call 3 (PART=3): launch sweeps of the kernels session 14 changed or flagged (the output
# kernel after `_mm_of_loaded`, rwkv7's low-rank gradients at 4 warps, the diagonal
# gradient kernel), then which mode of the WY kernel faults with bf16 dots (session 14:
# illegal memory accesses in kda's forward and deltanet's backward).
# Usage: OUT=dir PART=1|2|3 bash benchmarks/gpu_session.sh
set -u
cd "$(dirname "$0")"
ALL=deltanet,gated_deltanet,kda,rwkv7,linear_attention,retnet,gla,rwkv6,mamba2
if [ "${PART:-1}" = 1 ]; then
    OUT="$OUT" OPS=deltanet,gated_deltanet,kda,rwkv7 WARM_OPS=$ALL TESTS=1 WARM_S=230 \
        BENCH_S=330 bash gpu_bench.sh
elif [ "${PART}" = 2 ]; then
    OUT="$OUT" OPS=linear_attention,retnet,gla,rwkv6,mamba2 WARM_S=120 BENCH_S=300 \
        bash gpu_bench.sh
    timeout 150 python profile_chunk.py --out "$OUT" --ops $ALL
else
    timeout 150 python sweep_chunk_launch.py --out "$OUT" --ops deltanet,kda --kernels output
    timeout 100 python sweep_chunk_launch.py --out "$OUT" --ops rwkv7 --kernels low_rank_grads
    timeout 150 python sweep_chunk_launch.py --out "$OUT" --ops kda,gla --kernels diag_grads
    for s in "" "--set wy.num_warps=8" "--set wy.INVERSE=0" "--set wy.INVERSE=1"; do
        for op in kda deltanet; do
            # shellcheck disable=SC2086
            timeout 60 python probe_fault.py --op $op --K 128 --set DELTA_HALF_DOT=0 $s \
                >> "$OUT/probe_fault.txt" 2>&1
        done
    done
fi
