"""Recurrent forward and decode step: linforge's generated kernels beside fla 0.6.0.

Usage (on a CUDA machine): python benchmarks/bench_recurrent.py --out DIR
Writes DIR/recurrent.json and DIR/recurrent.md (median ms of triton.testing.do_bench, peak
memory above the inputs, first-call time including generation and compilation).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton

import linforge

B, T, H, K, V = 4, 4096, 16, 128, 128
DECODE_B = 64


def inputs(name: str, batch: int, length: int, dtype=torch.bfloat16, seed: int = 0,
           device: str = "cuda"):
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, device=device, generator=g)
    x = dict(q=rnd(batch, length, H, K), k=rnd(batch, length, H, K), v=rnd(batch, length, H, V))
    if name in ("gla", "rwkv6"):
        decay = torch.nn.functional.logsigmoid(rnd(batch, length, H, K)) / 16
        x["g" if name == "gla" else "w"] = decay
    if name in ("gated_deltanet",):
        x["g"] = torch.nn.functional.logsigmoid(rnd(batch, length, H)) / 16
    if name in ("deltanet", "gated_deltanet"):
        x["beta"] = torch.sigmoid(rnd(batch, length, H))
    if name == "rwkv6":
        x["r"] = x.pop("q")
        x["u"] = rnd(H, K) * 0.5
    return {k: (v.to(dtype) if k in ("q", "k", "v", "r") else v.float()) for k, v in x.items()}


def fla_op(name: str):
    """fla's fused_recurrent op for the same math, as f(x, initial_state, final) -> (o, S)."""
    if name == "gla":
        from fla.ops.gla import fused_recurrent_gla
        return lambda x, s0, fin: fused_recurrent_gla(x["q"], x["k"], x["v"], gk=x["g"],
                                                      initial_state=s0, output_final_state=fin)
    if name == "rwkv6":
        from fla.ops.rwkv6 import fused_recurrent_rwkv6
        return lambda x, s0, fin: fused_recurrent_rwkv6(x["r"], x["k"], x["v"], x["w"], x["u"],
                                                        scale=1.0, initial_state=s0,
                                                        output_final_state=fin)
    if name == "retnet":
        from fla.ops.retention import fused_recurrent_retention
        return lambda x, s0, fin: fused_recurrent_retention(x["q"], x["k"], x["v"],
                                                            initial_state=s0,
                                                            output_final_state=fin)
    if name == "gated_deltanet":
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
        return lambda x, s0, fin: fused_recurrent_gated_delta_rule(
            x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], initial_state=s0,
            output_final_state=fin, use_qk_l2norm_in_kernel=True)
    if name == "deltanet":
        from fla.ops.delta_rule import fused_recurrent_delta_rule
        return lambda x, s0, fin: fused_recurrent_delta_rule(
            x["q"], x["k"], x["v"], beta=x["beta"], initial_state=s0, output_final_state=fin,
            use_qk_l2norm_in_kernel=True)
    raise KeyError(name)


def peak_mib(fn) -> float:
    """The peak memory of one call of ``fn`` above what was allocated before it, MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def host_ms(fn, n: int = 20) -> float:
    """The host time of one call of ``fn`` (launches queued without synchronising), ms."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / n


def device_times(fn) -> dict:
    """CUDA time per kernel name (ms) over one call of ``fn`` (torch profiler), every
    kernel, after a call that compiles and warms."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            out[e.key] = out.get(e.key, 0.0) + t / 1e3
    return out


def cuda_ms(fn) -> float:
    """The GPU time of one call of ``fn``: every kernel's CUDA time summed. A wall time
    (``do_bench``) well above it means the call is host-bound."""
    return sum(device_times(fn).values())


def measure(fn, gpu_and_host: bool = False) -> dict:
    """Wall time (median of do_bench), peak memory and first call of ``fn``; with
    ``gpu_and_host`` also its GPU time (``cuda_ms``) and host time (``host_ms``)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    del out
    peak = peak_mib(fn)
    ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    row = {"ms": ms, "peak_mib": peak, "first_call_s": first}
    if gpu_and_host:
        row.update(cuda_ms=cuda_ms(fn), host_ms=host_ms(fn))
    return row


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def fwd_bwd(f, x: dict, do: torch.Tensor):
    """A training step of op ``f`` (forward, then backward of ``o`` against ``do``)."""
    def run():
        o = f(x)
        o.backward(do)
        return o
    return run


def with_grads(x: dict) -> dict:
    return {k: v.detach().requires_grad_() for k, v in x.items()}


def cell(r: dict | None, key: str, fmt: str) -> str:
    return format(r[key], fmt) if r and key in r else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ops", default="gla,retnet,rwkv6,deltanet,gated_deltanet")
    ap.add_argument("--backward", default="gla,retnet,rwkv6,deltanet,gated_deltanet",
                    help="ops timed forward + backward")
    ap.add_argument("--decode", default="gla,gated_deltanet", help="ops for the decode step")
    ap.add_argument("--tag", default="recurrent", help="output file stem")
    args = ap.parse_args()
    rows = []
    shape = f"B{B} T{T} H{H} K{K} V{V} bf16"

    def add(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    for name in filter(None, args.ops.split(",")):
        attn = linforge.library.get(name)
        x = inputs(name, B, T)
        row = {"op": name, "kind": "recurrent fwd", "shape": shape,
               "linforge": measure(lambda: attn(**x, form="recurrent"))}
        try:
            f = fla_op(name)
            row["fla"] = measure(lambda: f(x, None, False))
            row["max_rel_diff_vs_fla"] = rel_err(attn(**x, form="recurrent")[0],
                                                 f(x, None, False)[0])
        except Exception as e:  # record, do not hide, why fla could not run
            row["fla_error"] = f"{type(e).__name__}: {e}"[:300]
        add(row)
    for name in filter(None, args.backward.split(",")):
        attn = linforge.library.get(name)
        x = with_grads(inputs(name, B, T))
        do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
        row = {"op": name, "kind": "recurrent fwd+bwd", "shape": shape,
               "linforge": measure(fwd_bwd(lambda x: attn(**x, form="recurrent")[0], x, do))}
        try:
            f = fla_op(name)
            row["fla"] = measure(fwd_bwd(lambda x: f(x, None, False)[0], x, do))
        except Exception as e:
            row["fla_error"] = f"{type(e).__name__}: {e}"[:300]
        add(row)
    for name in filter(None, args.decode.split(",")):
        attn = linforge.library.get(name)
        x = {k: (v[:, 0] if v.dim() >= 3 and k != "u" else v)
             for k, v in inputs(name, DECODE_B, 1).items()}
        state = {"S": torch.randn(DECODE_B, H, K, V, device="cuda") * 0.1}
        ours = measure(lambda: attn.step(state, inplace=True, **x))
        floor_src = torch.empty_like(state["S"])
        row = {"op": name, "kind": "decode step", "shape": f"B{DECODE_B} H{H} K{K} V{V} "
               "fp32 state", "linforge": ours,
               "state_rw_floor": measure(lambda: floor_src.copy_(state["S"]))}
        try:
            f = fla_op(name)
            xs = {k: (v.unsqueeze(1) if k != "u" else v) for k, v in x.items()}
            s0 = state["S"].clone()
            row["fla"] = measure(lambda: f(xs, s0, True))
        except Exception as e:
            row["fla_error"] = f"{type(e).__name__}: {e}"[:300]
        add(row)
    write_report(rows, args.out, args.tag)


def write_report(rows: list[dict], out: str, tag: str) -> None:
    """``out/tag.json`` (rows and versions) and ``out/tag.md`` (a table), printed too."""
    dev = torch.cuda.get_device_name()
    meta = {"device": dev, "torch": torch.__version__, "triton": triton.__version__}
    try:
        import fla
        meta["fla"] = fla.__version__
    except Exception:
        meta["fla"] = "not installed"
    with open(f"{out}/{tag}.json", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    lines = [f"Device: {dev}; torch {meta['torch']}, triton {meta['triton']}, "
             f"fla {meta['fla']}.", "",
             "| op | kind | shape | linforge ms | fla ms | fla / linforge | linforge peak MiB | "
             "fla peak MiB | linforge first call s | fla first call s | floor ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    gpu = any("cuda_ms" in r["linforge"] for r in rows)
    if gpu:     # GPU time apart from wall time: a host-bound call's wall time is its host's
        lines[2] += " linforge GPU ms | fla GPU ms | fla / linforge GPU | linforge host ms | " \
                    "fla host ms |"
        lines[3] += "---|---|---|---|---|"
    for r in rows:
        ours, theirs = r["linforge"], r.get("fla")
        fl = r.get("state_rw_floor") or r.get("io_floor")
        ratio = f"{theirs['ms'] / ours['ms']:.2f}x" if theirs else "-"
        line = (f"| {r['op']} | {r['kind']} | {r['shape']} | {ours['ms']:.3f} | "
                f"{cell(theirs, 'ms', '.3f')} | {ratio} | {ours['peak_mib']:.0f} | "
                f"{cell(theirs, 'peak_mib', '.0f')} | {ours['first_call_s']:.1f} | "
                f"{cell(theirs, 'first_call_s', '.1f')} | {cell(fl, 'ms', '.3f')} |")
        if gpu:
            gpu_ratio = (f"{theirs['cuda_ms'] / ours['cuda_ms']:.2f}x"
                         if theirs and "cuda_ms" in theirs and "cuda_ms" in ours else "-")
            line += (f" {cell(ours, 'cuda_ms', '.3f')} | {cell(theirs, 'cuda_ms', '.3f')} | "
                     f"{gpu_ratio} | {cell(ours, 'host_ms', '.3f')} | "
                     f"{cell(theirs, 'host_ms', '.3f')} |")
        lines.append(line)
    with open(f"{out}/{tag}.md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
