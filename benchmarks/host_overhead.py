"""Host (Python) time of one chunked forward call, every kernel launch stubbed out.

Usage (no GPU needed): python benchmarks/host_overhead.py [--ops retnet,gla] [--calls 200]
[--backward]. B=1, T=256, H=2, K=V=128, bf16 inputs; prints the best of 5 rounds of
``--calls`` calls per op (with --backward: forward, then backward of the output against a
fixed gradient). A GPU call whose kernels take less than this is host-bound.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"    # (the stubs below replace every launch)
import torch  # noqa: E402

import linforge  # noqa: E402
import linforge.codegen.chunk_op as chunk_op  # noqa: E402
import linforge.codegen.launch as launch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from spec_inputs import make_inputs, spec_sizes  # noqa: E402


class _NoKernel:
    """Stands for a kernel: launching it does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None

    def __call__(self, *args, **kwargs):
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default="retnet,gla,rwkv6,linear_attention,mamba2,deltanet,"
                                     "gated_deltanet,kda,rwkv7")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    args = ap.parse_args()
    launch.Launcher._launch = lambda self, grid, *a, **k: None
    chunk_op.for_device = lambda fn, device: _NoKernel()
    for name in args.ops.split(","):
        attn = linforge.library.get(name)
        x = make_inputs(attn, B=1, T=256, H=2, sizes=spec_sizes(attn, K=128, V=128), seed=0)
        x = {k: v.to(torch.bfloat16) if k in ("q", "k", "v", "r") else v for k, v in x.items()}
        if args.backward:
            x = {k: v.requires_grad_() if v.is_floating_point() else v for k, v in x.items()}
            do = torch.randn_like(attn(**x, form="chunk")[0])

            def call():
                attn(**x, form="chunk")[0].backward(do)
        else:
            @torch.no_grad()
            def call():
                attn(**x, form="chunk")
        call()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(args.calls):
                call()
            best = min(best, (time.perf_counter() - t0) / args.calls)
        print(f"{name}: {best * 1e6:.0f} us", flush=True)


if __name__ == "__main__":
    main()
