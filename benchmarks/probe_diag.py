"""Where the diagonal-decay kernels' time goes (gla, B=4, T=4096, H=16, K=V=128, bf16).

Usage (CUDA): python benchmarks/probe_diag.py --out DIR. Runs one forward+backward, then
prints and writes DIR/probe_diag.json: registers, spills and shared memory of every compiled
chunk kernel, and the scores kernel with each sub-chunk's own pairs through dots (SPREAD
60, the default) and row by row (SPREAD 0) (median of do_bench).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

import linforge
import linforge.codegen.chunk_op as chunk_op
from bench_chunk import inputs


class Spy:
    """A launcher that remembers its last call's arguments."""

    def __init__(self, inner):
        self.inner, self.last = inner, None

    def __call__(self, grid, *args, **constexprs):
        self.last = (grid, args, constexprs)
        return self.inner(grid, *args, **constexprs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--op", default="gla")
    args = ap.parse_args()
    spy = chunk_op._SCORES = Spy(chunk_op._SCORES)
    attn = linforge.library.get(args.op)
    x = {k: v.detach().requires_grad_() for k, v in inputs(args.op).items()}
    o = attn(**x, form="chunk")[0]
    o.backward(torch.randn_like(o))
    torch.cuda.synchronize()
    rows = []
    for name in ("_STATES", "_OUTPUT", "_DSTATES", "_GRADS", "_DIAG_GRADS", "_CUMSUM"):
        launcher = getattr(chunk_op, name)
        for kernel in launcher.compiled.values():
            rows.append(dict(kernel=launcher.fn.__name__, n_regs=kernel.n_regs,
                             n_spills=kernel.n_spills, shared=kernel.metadata.shared,
                             num_warps=kernel.metadata.num_warps))
    grid, a, kw = spy.last
    fn = spy.inner.fn
    for spread in (60.0, 0.0):
        kernel = fn[grid](*a, **dict(kw, SPREAD=spread))
        ms = triton.testing.do_bench(lambda: fn[grid](*a, **dict(kw, SPREAD=spread)),
                                     warmup=10, rep=100, return_mode="median")
        rows.append(dict(kernel="chunk_diag_scores_kernel", spread=spread, ms=round(ms, 4),
                         n_regs=kernel.n_regs, n_spills=kernel.n_spills,
                         shared=kernel.metadata.shared, num_warps=kernel.metadata.num_warps))
    for r in rows:
        print(json.dumps(r), flush=True)
    with open(os.path.join(args.out, "probe_diag.json"), "w") as f:
        json.dump(dict(op=args.op, device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
