"""Sweep the launch options of each chunked kernel (V tile, warps, pipeline stages) on this GPU.

Usage (CUDA): python benchmarks/sweep_chunk_launch.py --out DIR [--ops retnet,gla]. For each
op (B=4, T=4096, H=16, K=V=128, bf16) and each kernel of ``--kernels`` ("states", "output",
"dstates", "grads", and for diagonal decays "scores", "diag_grads") it varies that kernel's
options alone (the others keep their defaults), and records the CUDA time of the kernel in
one forward+backward (torch profiler) and the largest difference of the output and the
gradients from the default options (a miscompiled configuration shows up there). Appends
rows to DIR/sweep_chunk_launch.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch

import linforge
import linforge.codegen.chunk_op as chunk_op
from bench_chunk import B, H, T, V, inputs

KERNELS = {"states": "chunk_states_kernel", "output": "chunk_output_kernel",
           "dstates": "chunk_dstates_kernel", "grads": "chunk_grads_kernel",
           "scores": "chunk_diag_scores_kernel", "diag_grads": "chunk_diag_grads_kernel",
           # the delta rule's (deltanet, gated_deltanet, kda) and the low rank's (rwkv7)
           "wy": "delta_wy_kernel", "wy_bwd": "delta_wy_bwd_kernel",
           "delta_states": "chunk_states_kernel", "delta_dstates": "chunk_dstates_kernel",
           "delta_grads": "chunk_grads_kernel", "delta_grads_no_decay": "chunk_grads_kernel",
           "low_rank_grads": "low_rank_",
           # the causal parallel form's forward (identity, scalar and diagonal decays)
           "parallel_output": "chunk_output_kernel", "parallel_grads": "chunk_grads_kernel"}
#: the form each kernel runs in (chunk unless named here)
FORM = {"parallel_output": "parallel", "parallel_grads": "parallel"}
GRID = {"states": dict(BV=[32, 64], num_stages=[1, 2, 3], num_warps=[4]),
        "dstates": dict(BV=[32, 64], num_stages=[1, 2, 3], num_warps=[4]),
        # K and V tiles of 32 take the spills of these two kernels from 0.8-3.5 KB per
        # thread to 0-1.5 KB (benchmarks/compile_check.py, sm_90): measure before adopting
        "output": dict(BK=[32, 64], BV=[32, 64], num_stages=[1], num_warps=[4, 8]),
        "grads": dict(BK=[32, 64], BV=[32, 64], num_stages=[1], num_warps=[4, 8]),
        # diagonal decays only: stages pipeline the loads of the row-by-row sub-chunk loops
        "scores": dict(num_stages=[1, 2, 3], num_warps=[2, 4, 8]),
        "diag_grads": dict(BK=[32, 64], num_stages=[1, 2], num_warps=[4, 8]),
        # the delta kernels hold all of K per program (WY at 4 warps since session 9, the
        # others at 8); INVERSE: the WY kernel's inverse (delta_wy_kernel)
        "wy": dict(num_stages=[1], num_warps=[4, 8], INVERSE=[0, 1, 2, 3]),
        # BKW: the K block its passes walk (64 by default since session 14's sweep on an
        # H100, though 32 spills less on sm_90; all of K at once spilled 2-2.4 KB)
        "wy_bwd": dict(BKW=[32, 64], num_stages=[1, 2], num_warps=[4, 8]),
        # (4 warps: two programs per SM, all 256 of them in one wave, no spills in the
        # states kernel on sm_90 since session 10; BV 64: half the programs, W read twice)
        "delta_states": dict(BV=[32, 64], num_stages=[1, 2, 3], num_warps=[4, 8]),
        "delta_dstates": dict(BV=[32, 64], num_stages=[1, 2], num_warps=[4, 8]),
        # K 32 / V 64 by default (session 14's sweep on an H100: best for gated_deltanet and
        # kda; deltanet's best is K 64 / V 64)
        "delta_grads": dict(BK=[32, 64], BV=[32, 64], num_stages=[1], num_warps=[4, 8]),
        "delta_grads_no_decay": dict(BK=[32, 64], BV=[32, 64], num_stages=[1],
                                     num_warps=[4, 8]),
        "low_rank_grads": dict(num_stages=[1, 2], num_warps=[4, 8]),
        # whole K and V tiles: the scores of a block pair made once, not once per V tile
        # (no spills on sm_90 at 4 or 8 warps, session 10)
        "parallel_output": dict(BK=[64, 128], BV=[64, 128], num_stages=[1, 3],
                                num_warps=[4, 8]),
        # (spills 0.1-0.4 KB per thread at every one of these on sm_90, session 10)
        "parallel_grads": dict(BK=[64, 128], BV=[64, 128], num_stages=[1], num_warps=[4, 8])}


def step(attn, x, do, form: str = "chunk"):
    xg = {k: v.detach().requires_grad_() for k, v in x.items()}
    o = attn(**xg, form=form)[0]
    o.backward(do)
    return o.detach().float(), {k: v.grad.float() for k, v in xg.items()}


def kernel_ms(fn, name: str) -> float:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    total = sum(getattr(e, "device_time_total", 0) for e in prof.key_averages()
                if e.key.startswith(name))
    return round(total / 3000, 4)


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ops", default="retnet")
    ap.add_argument("--kernels", default=",".join(GRID), help="which kernels to sweep")
    args = ap.parse_args()
    defaults = {k: dict(v) for k, v in chunk_op.KERNEL_OPTIONS.items()}

    def options(kernel: str | None = None, opts: dict | None = None) -> None:
        """Every kernel's default options, ``kernel``'s with ``opts`` over them."""
        chunk_op.KERNEL_OPTIONS.clear()
        chunk_op.KERNEL_OPTIONS.update({k: dict(v) for k, v in defaults.items()})
        if kernel is not None:
            chunk_op.KERNEL_OPTIONS[kernel] = {**defaults.get(kernel, {}), **opts}
    path = os.path.join(args.out, "sweep_chunk_launch.jsonl")
    for name in args.ops.split(","):
        attn = linforge.library.get(name)
        x = inputs(name)
        do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
        refs = {}
        for kernel in args.kernels.split(","):
            form = FORM.get(kernel, "chunk")
            if form not in attn.info()["forms"]:
                continue
            if form not in refs:
                options()
                refs[form] = step(attn, x, do, form)
            o_ref, g_ref = refs[form]
            grid = GRID[kernel]
            keys = list(grid)
            for values in itertools.product(*grid.values()):
                opts = dict(zip(keys, values))
                options(kernel, opts)   # every other kernel's as they are by default
                row = {"op": name, "kernel": kernel, **opts}
                try:
                    o, g = step(attn, x, do, form)
                    row["max_rel_diff"] = max([rel(o, o_ref)] + [rel(g[k], g_ref[k])
                                                                  for k in g_ref])
                    row["ms"] = kernel_ms(lambda: step(attn, x, do, form), KERNELS[kernel])
                except Exception as e:   # record and go on
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                print(json.dumps(row), flush=True)
                with open(path, "a") as f:
                    f.write(json.dumps(dict(row, device=torch.cuda.get_device_name())) + "\n")
    options()


if __name__ == "__main__":
    main()
