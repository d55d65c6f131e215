"""Which kernel faults: one chunked forward + backward of an op at a given head size, every
launch synchronous (CUDA_LAUNCH_BLOCKING=1, set here), under a switch (``--set``, as
profile_chunk.py). Prints the kernel launched last before a fault, or "ok".

Usage (CUDA): python benchmarks/probe_fault.py --op rwkv7 --K 256 [--set PREDECAY=0]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["CUDA_LAUNCH_BLOCKING"] = "1"
import torch  # noqa: E402

import linforge  # noqa: E402
import linforge.codegen.launch as launch  # noqa: E402
from switches import apply_settings  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from spec_inputs import make_inputs, make_state, spec_sizes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", default="rwkv7")
    ap.add_argument("--K", type=int, default=256)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    apply_settings(args.set)
    last = []
    launch_ = launch.Launcher._launch

    def traced(self, grid, *a, **k):
        last.append(self.fn.__name__)
        launch_(self, grid, *a, **k)
        torch.cuda.synchronize()
    launch.Launcher._launch = traced
    attn = linforge.library.get(args.op)
    sizes = spec_sizes(attn, K=args.K, V=args.K)
    x = make_inputs(attn, B=1, T=200, H=2, sizes=sizes, seed=11, device="cuda")
    x = {n: t.to(torch.bfloat16).requires_grad_() for n, t in x.items()}
    init = make_state(attn, N=1, H=2, sizes=sizes, device="cuda")
    try:
        o, _ = attn(**x, initial_state=init, output_final_state=True, form="chunk")
        o.float().sum().backward()
        torch.cuda.synchronize()
        print(args.op, args.K, args.set, "ok", flush=True)
    except Exception as e:
        print(args.op, args.K, args.set, "FAULT after", last[-1:], type(e).__name__,
              str(e)[:120], flush=True)


if __name__ == "__main__":
    main()
