"""The three forms against each other and beside SDPA (FlashAttention), over sequence length.

Usage (CUDA): python benchmarks/bench_forms.py --out DIR [--ops linear_attention,retnet]
[--lengths 512,1024,2048,4096,8192,16384] [--tokens 65536]. For each causal op and length T
(batch B = tokens / T, H=16, K=V=128, bf16) it times form="recurrent", "chunk" and
"parallel", forward and forward+backward, and torch's scaled_dot_product_attention (causal,
the same q, k, v) as the softmax baseline; then the noncausal efficientvit on image-like
shapes (B=32, T=4096, H=8, K=V=32) beside non-causal SDPA. Writes DIR/forms.json,
DIR/forms.md (the table and, per op and direction, the fastest form at each T: the
crossover points ``form="auto"`` should use, and per op the bound for
``api.AUTO_PARALLEL_MAX_T``) and DIR/forms.png when matplotlib is there.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton

import linforge
from bench_recurrent import measure

H, K, V = 16, 128, 128
FORMS = ("recurrent", "chunk", "parallel")


def _inputs(attn, B: int, T: int, h: int, k: int, v: int, seed: int = 0) -> dict:
    """bf16 q, k, v (and fp32 gates where the spec has them) for ``attn``."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    sizes = {"K": k, "V": v}
    x = {}
    for name, decl in attn.program.inputs.items():
        t = torch.randn(B, T, h, *(sizes[d] for d in decl.dims), device="cuda", generator=g)
        x[name] = t.to(torch.bfloat16) if name in ("q", "k", "v") else t
    return x


def _sdpa(q, k, v, causal: bool):
    """FlashAttention through torch (layout [B, H, T, D])."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                          v.transpose(1, 2), is_causal=causal).transpose(1, 2)


def _step(f, x: dict, do: torch.Tensor):
    xg = {n: t.detach().requires_grad_() for n, t in x.items()}

    def run():
        o = f(xg)
        o.backward(do)
        return o
    return run


def _time(f, x: dict, v: int) -> dict:
    """Forward and forward+backward of ``f`` (ms, peak MiB, first call s)."""
    B, T, h = next(iter(x.values())).shape[:3]
    do = torch.randn(B, T, h, v, device="cuda", dtype=torch.bfloat16)
    out = {}
    with torch.no_grad():
        out["fwd"] = measure(lambda: f(x))
    out["fwd+bwd"] = measure(_step(f, x, do))
    return out


def _fastest(rows: list[dict]) -> list[dict]:
    """Per op, direction and T: the fastest linforge form (the crossover table)."""
    best = []
    keys = sorted({(r["op"], r["direction"], r["T"]) for r in rows if r["impl"] in FORMS})
    for op, direction, T in keys:
        sel = [r for r in rows if (r["op"], r["direction"], r["T"]) == (op, direction, T)
               and r["impl"] in FORMS and "ms" in r]
        if sel:
            win = min(sel, key=lambda r: r["ms"])
            best.append({"op": op, "direction": direction, "T": T, "form": win["impl"],
                         "ms": round(win["ms"], 4)})
    return best


def _parallel_bounds(rows: list[dict]) -> dict:
    """Per causal op: the largest measured T up to which the parallel form was the fastest
    linforge form at every measured length, forward and forward+backward (0: not even at
    the shortest), with the op's transition class: what ``api.AUTO_PARALLEL_MAX_T`` stores."""
    bounds = {}
    for op in sorted({r["op"] for r in rows if r["op"] != "efficientvit"}):
        best = {(b["direction"], b["T"]): b["form"] for b in _fastest(rows) if b["op"] == op}
        up_to = 0
        for T in sorted({T for _, T in best}):
            if any(best.get((d, T)) != "parallel" for d in ("fwd", "fwd+bwd")):
                break
            up_to = T
        cls = linforge.library.get(op).analysis.transition_class
        bounds[op] = {"class": cls.name, "parallel_up_to": up_to}
    return bounds


def _write(rows: list[dict], out: str) -> None:
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__}
    best = _fastest(rows)
    bounds = _parallel_bounds(rows)
    with open(f"{out}/forms.json", "w") as fh:
        json.dump({"meta": meta, "rows": rows, "fastest": best, "parallel_bounds": bounds},
                  fh, indent=1)
    lines = [f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}.", "",
             "| op | T | B | direction | implementation | ms | peak MiB | first call s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cell = (f"{r['ms']:.3f} | {r['peak_mib']:.0f} | {r['first_call_s']:.1f}" if "ms" in r
                else f"{r.get('error', '')[:60]} | - | -")
        lines.append(f"| {r['op']} | {r['T']} | {r['B']} | {r['direction']} | {r['impl']} | "
                     f"{cell} |")
    lines += ["", "Fastest linforge form:", "", "| op | direction | T | form | ms |",
              "|---|---|---|---|---|"]
    lines += [f"| {b['op']} | {b['direction']} | {b['T']} | {b['form']} | {b['ms']} |"
              for b in best]
    lines += ["", "For api.AUTO_PARALLEL_MAX_T (the parallel form fastest up to this T, both "
              "directions; 0: never):", "", "| op | class | parallel up to T |", "|---|---|---|"]
    lines += [f"| {op} | {b['class']} | {b['parallel_up_to']} |" for op, b in bounds.items()]
    with open(f"{out}/forms.md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    _plot(rows, out)


def _plot(rows: list[dict], out: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    panels = sorted({(r["op"], r["direction"]) for r in rows if r["op"] != "efficientvit"})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (op, direction) in zip(axes[0], panels):
        for impl in (*FORMS, "sdpa"):
            sel = sorted((r["T"], r["ms"]) for r in rows if "ms" in r and r["op"] == op
                         and r["direction"] == direction and r["impl"] == impl)
            if sel:
                ax.plot(*zip(*sel), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="T (B x T fixed)", ylabel="ms",
               title=f"{op} {direction}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(f"{out}/forms.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ops", default="linear_attention,retnet")
    ap.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--tokens", type=int, default=65536, help="B * T of every causal run")
    ap.add_argument("--noncausal", default="efficientvit", help="'' to skip")
    args = ap.parse_args()
    rows: list[dict] = []

    def record(op, T, B, impl, f, x, v):
        try:
            timed = _time(f, x, v)
        except Exception as e:  # a form that fails at a size is recorded, the run goes on
            timed = {d: {"error": f"{type(e).__name__}: {e}"[:300]} for d in ("fwd", "fwd+bwd")}
        for direction, t in timed.items():
            rows.append({"op": op, "T": T, "B": B, "direction": direction, "impl": impl, **t})
        _write(rows, args.out)

    for name in filter(None, args.ops.split(",")):
        attn = linforge.library.get(name)
        for T in map(int, args.lengths.split(",")):
            B = max(1, args.tokens // T)
            x = _inputs(attn, B, T, H, K, V)
            for form in FORMS:
                record(name, T, B, form, lambda x, form=form: attn(**x, form=form)[0], x, V)
            record(name, T, B, "sdpa", lambda x: _sdpa(x["q"], x["k"], x["v"], True), x, V)
    for name in filter(None, args.noncausal.split(",")):
        attn = linforge.library.get(name)
        B, T, h, d = 32, 4096, 8, 32
        x = _inputs(attn, B, T, h, d, d)
        record(name, T, B, "parallel", lambda x: attn(**x, form="parallel")[0], x, d)
        record(name, T, B, "sdpa", lambda x: _sdpa(x["q"], x["k"], x["v"], False), x, d)


if __name__ == "__main__":
    main()
