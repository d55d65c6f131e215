"""Sweep the chunked kernels' dot precision and warps per program on this GPU.

Usage: python benchmarks/tune_chunk.py --out DIR [--dot 0|1] [--ops ...]. Appends to
DIR/tune_chunk.json one row per (op, dot, num_warps): median ms of the forward and the
forward+backward (B=4, T=4096, H=16, K=V=128, bf16), the forward's max difference from the
tf32 run, and a kernel-time breakdown of one forward+backward (torch profiler). Run each
dot setting in its own process: a faulting kernel spoils the CUDA context.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

import linforge
import linforge.codegen.chunk_op as chunk_op
import linforge.codegen.ops as ops
from bench_chunk import B, H, T, V, inputs, train
from bench_recurrent import device_times


def bench(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=80, return_mode="median")


def kernel_times(fn) -> dict:
    """CUDA time per kernel name (ms) over one call of ``fn``: the 12 longest."""
    out = {}
    for name, ms in device_times(fn).items():
        out[name[:60]] = out.get(name[:60], 0.0) + ms
    return {k: round(v, 4) for k, v in sorted(out.items(), key=lambda kv: -kv[1])[:12]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ops", default="linear_attention,retnet,mamba2,gla,rwkv6")
    ap.add_argument("--dot", type=int, default=1, help="0 bf16, 1 tf32")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    path = os.path.join(args.out, "tune_chunk.json")
    for name in args.ops.split(","):
        attn = linforge.library.get(name)
        x = inputs(name)
        xg = {k: v.detach().requires_grad_() for k, v in x.items()}
        do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
        chunk_op.FORCE_DOT = 1
        ops.FORCE_NUM_WARPS = 4
        with torch.no_grad():
            ref = attn(**x, form="chunk")[0].float()
        chunk_op.FORCE_DOT = args.dot
        for warps in map(int, args.warps.split(",")):
            ops.FORCE_NUM_WARPS = warps
            row = {"op": name, "dot": args.dot, "num_warps": warps,
                   "device": torch.cuda.get_device_name()}
            try:
                with torch.no_grad():
                    o = attn(**x, form="chunk")[0].float()
                row["max_rel_diff_vs_tf32"] = ((o - ref).abs().max() / ref.abs().max()).item()
                row["fwd"] = bench(torch.no_grad()(lambda: attn(**x, form="chunk")))
                step = train(lambda x: attn(**x, form="chunk")[0], xg, do)
                row["fwd_bwd"] = bench(step)
                if args.profile:
                    row["kernels_fwd_bwd"] = kernel_times(step)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            print(json.dumps(row), flush=True)
            with open(path, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
