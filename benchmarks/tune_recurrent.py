"""Sweep the recurrent kernels' V block and warps per program on this GPU.

Usage: python benchmarks/tune_recurrent.py --out DIR. Writes DIR/tune.json: median ms of the
forward (B=4, T=4096, H=16, K=V=128, bf16), forward+backward, and the decode step (B=64) for
each (BV, num_warps). The defaults in codegen/ops.py come from these measurements.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

import linforge
import linforge.codegen.ops as ops
from bench_recurrent import B, DECODE_B, H, K, T, V, fwd_bwd, inputs, with_grads


def bench(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ops", default="gla,rwkv6,deltanet,gated_deltanet")
    args = ap.parse_args()
    rows = []
    for name in args.ops.split(","):
        attn = linforge.library.get(name)
        x = inputs(name, B, T)
        xg = with_grads(x)
        do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
        xd = {k: (v[:, 0] if v.dim() >= 3 and k != "u" else v)
              for k, v in inputs(name, DECODE_B, 1).items()}
        state = {"S": torch.randn(DECODE_B, H, K, V, device="cuda") * 0.1}
        for bv in (8, 16, 32, 64):
            for warps in (1, 2, 4, 8):
                ops.FORCE_BLOCK_V, ops.FORCE_NUM_WARPS = bv, warps
                attn._decoders.clear()  # decoders are prepared with the blocks of their time
                row = {"op": name, "BV": bv, "num_warps": warps}
                row["fwd"] = bench(lambda: attn(**x, form="recurrent"))
                row["decode"] = bench(lambda: attn.step(state, inplace=True, **xd))
                if bv <= 32:
                    try:
                        row["fwd_bwd"] = bench(fwd_bwd(lambda x: attn(**x, form="recurrent")[0],
                                                       xg, do))
                    except Exception as e:  # e.g. out of registers/shared memory
                        row["fwd_bwd_error"] = str(e)[:200]
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(f"{args.out}/tune.json", "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
