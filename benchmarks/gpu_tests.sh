#!/usr/bin/env bash
# GPU tests in parallel processes (their kernels compile on separate CPU cores), one log per
# selection under /tmp/gpu_logs, the last lines of each in $OUT/gpu_tests.txt.
# Usage: OUT=dir TEST_S=200 bash benchmarks/gpu_tests.sh "file::sel" "file::sel" ...
# (pytest's addopts name pytest-xdist: carry its wheel and execnet's in .wheels/)
set -u
cd "$(dirname "$0")/.."
mkdir -p /tmp/gpu_logs
i=0
for item in "$@"; do
    i=$((i + 1))
    file="${item%%::*}"
    sel="${item#*::}"
    echo "$item" > "/tmp/gpu_logs/$i.txt"
    timeout -s INT "${TEST_S:-200}" python -m pytest -q -n 0 -m gpu "$file" -k "$sel" \
        >> "/tmp/gpu_logs/$i.txt" 2>&1 &
done
wait
for f in /tmp/gpu_logs/*.txt; do
    echo "== $(head -1 "$f")"
    grep -E "passed|failed|error|Error|assert" "$f" | tail -n 6
done | tee "$OUT/gpu_tests.txt"
