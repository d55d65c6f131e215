"""Peak memory of the chunked form's calls without a GPU: every tensor the call allocates is
tracked (a torch dispatch mode sees each new storage, a finalizer its release, autograd's
saved tensors included) while the kernels are not run (their launches go to a stub, as in
preflight.py), so the peak of live bytes is the one a GPU run's allocations would reach,
less the caching allocator's rounding. Same inputs, shapes and protocol as bench_chunk.py
(forward under no_grad; forward+backward measured on the second call, the first one's
.grad already in place).

Usage: python benchmarks/peak_memory.py [--ops gated_deltanet,kda] [--kind fwd,fwd+bwd]
[--set NAME=VALUE ...] (a switch of linforge.codegen.chunk_op, as profile_chunk.py's)
[--trace]. Prints one JSON line per op and kind: peak_mib above what was live before the
call (with --trace, each allocation live at the peak: MiB, op, linforge source line).
On 2026-12-05 it gave, against the H200's measured peaks of session 8, retnet 193 / 648
MiB (196 / 657 measured), mamba2 321 / 1030 (325 / 1034), gla 352 / 938 (356 / 946), rwkv6
416 / 1383 (420 / 1387) for the forward / forward+backward: the 4 MiB is the final state,
no longer allocated unless asked for since.
"""

from __future__ import annotations

import argparse
import json
import os
import traceback
import weakref

os.environ.setdefault("TRITON_INTERPRET", "1")  # (nothing runs; triton must not look for CUDA)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import linforge  # noqa: E402
import linforge.codegen.launch as launch  # noqa: E402
from bench_chunk import B, H, T, V, inputs  # noqa: E402
from switches import apply_settings  # noqa: E402


def _where() -> str:
    """The innermost linforge source line of the current Python stack."""
    for frame in reversed(traceback.extract_stack()):
        if "/linforge/" in frame.filename.replace(os.sep, "/") and \
                "benchmarks" not in frame.filename:
            return f"{os.path.basename(frame.filename)}:{frame.lineno}"
    return "?"


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op creates while it is alive, and the peak; with
    ``trace``, which allocations (op and linforge source line) were live at the peak."""

    def __init__(self, trace: bool = False):
        super().__init__()
        self.live = self.peak = 0
        self.seen: weakref.WeakSet = weakref.WeakSet()
        self.trace = trace
        self.labels: dict[int, tuple[int, str]] = {}
        self.at_peak: list[tuple[int, str]] = []

    def know(self, tensors) -> None:
        """Storages that exist already (the inputs): never counted."""
        for t in tensors:
            self.seen.add(t.untyped_storage())

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.labels.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self.seen:
                    self.seen.add(storage)
                    self.live += storage.nbytes()
                    key = id(storage)
                    if self.trace:
                        self.labels[key] = (storage.nbytes(), f"{func.__name__} {_where()}")
                    if self.live > self.peak:
                        self.peak = self.live
                        if self.trace:
                            self.at_peak = sorted(self.labels.values(), reverse=True)
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def peak_mib(fn, known, trace: bool = False) -> tuple[float, list]:
    """The peak of live bytes one call of ``fn`` allocates, MiB, and (``trace``) what was
    live then: (MiB, op and source line) per allocation, largest first."""
    mode = LiveBytes(trace)
    mode.know(known)
    with mode:
        fn()
    return mode.peak / 2**20, [(round(n / 2**20, 1), label) for n, label in mode.at_peak]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default="linear_attention,retnet,mamba2,gla,rwkv6,deltanet,"
                                     "gated_deltanet,kda,rwkv7")
    ap.add_argument("--kind", default="fwd,fwd+bwd")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--trace", action="store_true", help="list what is live at the peak")
    args = ap.parse_args()
    apply_settings(args.set)
    launch.PREFLIGHT = lambda *a: None      # kernels compiled and run by no one
    launch._INTERPRETING = False            # the GPU's choices (dot precisions, buffers)
    for name in args.ops.split(","):
        attn = linforge.library.get(name)
        x = inputs(name, device="cpu")
        for kind in args.kind.split(","):
            if kind == "fwd":
                with torch.no_grad():
                    peak, live = peak_mib(lambda: attn(**x, form="chunk"), x.values(),
                                          args.trace)
            else:
                xg = {k: v.detach().requires_grad_() for k, v in x.items()}
                do = torch.randn(B, T, H, V, dtype=torch.bfloat16)

                def step():
                    attn(**xg, form="chunk")[0].backward(do)
                step()
                peak, live = peak_mib(step, [*xg.values(), do,
                                             *(t.grad for t in xg.values())], args.trace)
            row = dict(op=name, kind=kind, peak_mib=round(peak, 1), settings=args.set)
            print(json.dumps(dict(row, live_at_peak=live) if args.trace else row), flush=True)


if __name__ == "__main__":
    main()
