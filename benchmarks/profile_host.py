"""Where a chunked forward's host time goes on the GPU machine: cProfile over repeated
calls (launches queued, one synchronize at the end), the top functions by own time.

Usage (CUDA): python benchmarks/profile_host.py [--ops mamba2,retnet] [--calls 200]
[--out DIR]. Shapes as bench_chunk.py (B=4, T=4096, H=16, K=V=128, bf16), no gradients.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time

import torch

import linforge
from bench_chunk import inputs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default="mamba2,retnet,linear_attention")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    report = []
    for name in args.ops.split(","):
        attn = linforge.library.get(name)
        x = inputs(name)
        with torch.no_grad():
            attn(**x, form="chunk")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                attn(**x, form="chunk")
            host_us = (time.perf_counter() - t0) / args.calls * 1e6
            torch.cuda.synchronize()
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(args.calls):
                attn(**x, form="chunk")
            profile.disable()
            torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
        report.append(f"== {name}: host {host_us:.0f} us per call (unprofiled)\n"
                      + text.getvalue())
        print(report[-1], flush=True)
    if args.out:
        with open(os.path.join(args.out, "profile_host.txt"), "w") as f:
            f.write("\n".join(report))


if __name__ == "__main__":
    main()
