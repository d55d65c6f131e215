"""Where a chunked call's time goes: wall time, host time and CUDA time per kernel.

Usage (CUDA): python benchmarks/profile_chunk.py --out DIR [--ops ...] [--set NAME=VALUE
...]. ``--set`` sets a switch of ``linforge.codegen.chunk_op`` for the run (``WY_INVERSE=1``,
``DELTA_HALF_BUFFERS=1``); the rows record it. For each op (B=4,
T=4096, H=16, K=V=128, bf16) it prints and writes DIR/profile_chunk.json: the median wall
time of a forward and of a forward+backward (do_bench), the host time of one call (launches
queued without synchronising, averaged over 20 calls), the CUDA time of every kernel of
one call (torch profiler), and the largest difference of the output and every gradient from
the recurrent form's, and the peak memory above the inputs. Wall time well above the
kernels' sum means host overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import triton

import linforge
from bench_chunk import B, H, T, V, _grads, fla_op, inputs, train
from bench_recurrent import host_ms, peak_mib, rel_err
from switches import apply_settings
from tune_chunk import kernel_times


_REFERENCE: dict = {}


def against_recurrent(attn, x: dict, do: torch.Tensor, form: str) -> dict:
    """The largest difference of the output and of every gradient from the recurrent
    form's (fp32 state), over its largest value: the accuracy of this run's settings."""
    if attn.name not in _REFERENCE:
        with torch.no_grad():
            o = attn(**x, form="recurrent")[0].float()
        xg = {k: v.detach().requires_grad_() for k, v in x.items()}
        _REFERENCE[attn.name] = (o, _grads(lambda x: attn(**x, form="recurrent")[0], xg, do))
    o_ref, g_ref = _REFERENCE[attn.name]
    with torch.no_grad():
        o = attn(**x, form=form)[0].float()
    xg = {k: v.detach().requires_grad_() for k, v in x.items()}
    g = _grads(lambda x: attn(**x, form=form)[0], xg, do)
    diffs = {"o": rel_err(o, o_ref)} | {f"d{k}": rel_err(g[k], t) for k, t in g_ref.items()}
    return {k: float(f"{e:.3g}") for k, e in diffs.items()}


def profile_op(name: str, form: str) -> list[dict]:
    """Rows for op ``name`` in ``form``, or of fla's op computing the same (form "fla")."""
    attn = linforge.library.get(name)
    op = fla_op(name) if form == "fla" else (lambda x: attn(**x, form=form)[0])
    x = inputs(name)
    rows = []
    fwd = torch.no_grad()(lambda: op(x))
    xg = {k: v.detach().requires_grad_() for k, v in x.items()}
    do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    step = train(op, xg, do)
    for kind, fn in (("fwd", fwd), ("fwd+bwd", step)):
        row = {"op": name, "form": form, "kind": kind}
        try:
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            row["first_s"] = round(time.perf_counter() - t0, 2)
            row["ms"] = round(triton.testing.do_bench(fn, warmup=10, rep=100,
                                                      return_mode="median"), 4)
            row["host_ms"] = round(host_ms(fn), 4)
            row["peak_mib"] = round(peak_mib(fn), 1)
            row["kernels"] = kernel_times(fn)
            row["kernel_sum_ms"] = round(sum(row["kernels"].values()), 4)
            if kind == "fwd+bwd" and form not in ("recurrent", "fla"):
                row["vs_recurrent"] = against_recurrent(attn, x, do, form)
        except Exception as e:  # report and go on
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ops", default="retnet,linear_attention,mamba2,gla,rwkv6")
    ap.add_argument("--form", default="chunk", help="chunk, recurrent, ..., or fla (fla's op "
                    "for the same math, for its kernels' times)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a chunk_op switch for this run (repeatable)")
    args = ap.parse_args()
    settings = apply_settings(args.set)
    for name in args.ops.split(","):
        rows = profile_op(name, args.form)
        # (appended op by op: a run cut by its time limit keeps what it measured)
        with open(os.path.join(args.out, "profile_chunk.json"), "a") as f:
            for r in rows:
                f.write(json.dumps(dict(r, settings=settings,
                                        device=torch.cuda.get_device_name())) + "\n")


if __name__ == "__main__":
    main()
