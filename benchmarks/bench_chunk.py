"""Chunked form: linforge beside fla 0.6.0's chunk kernels (B=4, T=4096, H=16, K=V=128, bf16).

Usage (CUDA): python benchmarks/bench_chunk.py --out DIR. Writes DIR/chunk.json and
DIR/chunk.md: median ms (triton.testing.do_bench) of forward and forward+backward, peak
memory above the inputs, first call, the forward's memory floor (``io_floor``), and apart
from the wall time the GPU time (every kernel's CUDA time, summed) and the host time of a
call: fla's forwards are host-bound on some machines, and their wall time then moves with
the CPU (0.69 to 1.29 ms for gated_deltanet on H100s in sessions 13-14, at 0.61 ms of GPU
time). fla's ops get the same math: the per-token maps a linforge spec contains (feature
maps, gates) run as torch ops inside fla's timed call.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import linforge
from bench_recurrent import inputs as recurrent_inputs
from bench_recurrent import measure, write_report

#: ops timed forward only, without gradients (every chunked form has a backward now)
FORWARD_ONLY: tuple[str, ...] = ()

B, T, H, K, V = 4, 4096, 16, 128, 128


def inputs(name: str, seed: int = 0, device: str = "cuda") -> dict:
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*s, dtype=torch.bfloat16):
        return torch.randn(*s, device=device, generator=g).to(dtype)
    if name == "mamba2":
        return dict(x=rnd(B, T, H, V), B=rnd(B, T, H, K), C=rnd(B, T, H, K),
                    dt=rnd(B, T, H, dtype=torch.float32) * 0.5 - 1.0,
                    A=-torch.exp(rnd(H, dtype=torch.float32) * 0.5),
                    D=rnd(H, dtype=torch.float32), dt_bias=rnd(H, dtype=torch.float32) * 0.1)
    if name in ("gla", "rwkv6", "deltanet", "gated_deltanet"):
        return recurrent_inputs(name, B, T, seed=seed, device=device)
    if name == "kda":       # q, k l2-normalized inside the spec (fla: in its kernel)
        return dict(q=rnd(B, T, H, K), k=rnd(B, T, H, K), v=rnd(B, T, H, V),
                    g=F.logsigmoid(rnd(B, T, H, K, dtype=torch.float32)) / 16,
                    beta=torch.sigmoid(rnd(B, T, H, dtype=torch.float32)))
    if name == "rwkv7":     # as the model makes them: a = -kappa, b = kappa * a_in
        kappa = F.normalize(rnd(B, T, H, K, dtype=torch.float32), dim=-1)
        a_in = torch.sigmoid(rnd(B, T, H, K, dtype=torch.float32))
        return dict(r=rnd(B, T, H, K), k=rnd(B, T, H, K) * K ** -0.5, v=rnd(B, T, H, V),
                    w=-0.6065 * torch.sigmoid(rnd(B, T, H, K, dtype=torch.float32)),
                    a=(-kappa).to(torch.bfloat16), b=(kappa * a_in).to(torch.bfloat16))
    return dict(q=rnd(B, T, H, K), k=rnd(B, T, H, K), v=rnd(B, T, H, V))


def fla_op(name: str):
    """fla's chunk op computing the spec's math: f(x) -> o."""
    if name == "linear_attention":
        from fla.ops.linear_attn import chunk_linear_attn
        return lambda x: chunk_linear_attn(F.elu(x["q"]) + 1, F.elu(x["k"]) + 1, x["v"],
                                           scale=1.0, normalize=True)[0]
    if name == "retnet":
        from fla.ops.retention import chunk_retention
        return lambda x: chunk_retention(x["q"], x["k"], x["v"])[0]
    if name == "mamba2":
        from fla.ops.simple_gla import chunk_simple_gla

        def run(x):
            dt = F.softplus(x["dt"] + x["dt_bias"])
            o = chunk_simple_gla(x["C"], x["B"], x["x"] * dt[..., None].to(x["x"].dtype),
                                 g=dt * x["A"], scale=1.0)[0]
            return o + x["D"][:, None] * x["x"]
        return run
    if name == "gla":
        from fla.ops.gla import chunk_gla
        return lambda x: chunk_gla(x["q"], x["k"], x["v"], g=x["g"])[0]
    if name == "rwkv6":
        from fla.ops.rwkv6 import chunk_rwkv6
        return lambda x: chunk_rwkv6(x["r"], x["k"], x["v"], x["w"], x["u"], scale=1.0)[0]
    if name == "deltanet":
        from fla.ops.delta_rule import chunk_delta_rule
        return lambda x: chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"],
                                          use_qk_l2norm_in_kernel=True)[0]
    if name == "gated_deltanet":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return lambda x: chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                                use_qk_l2norm_in_kernel=True)[0]
    if name == "kda":
        from fla.ops.kda import chunk_kda
        return lambda x: chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                   use_qk_l2norm_in_kernel=True)[0]
    if name == "rwkv7":
        from fla.ops.rwkv7 import chunk_rwkv7
        return lambda x: chunk_rwkv7(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"],
                                     scale=1.0)[0]
    raise KeyError(name)


def io_floor(x: dict) -> dict:
    """The forward's memory floor: a device copy moving as many bytes as reading every input
    once and writing the [B, T, H, V] bf16 output once (a copy of n/2 bytes reads and
    writes n/2 each)."""
    n = sum(t.numel() * t.element_size() for t in x.values()) + B * T * H * V * 2
    src = torch.empty(n // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return measure(lambda: dst.copy_(src))


def train(f, x: dict, do: torch.Tensor):
    def run():
        o = f(x)
        o.backward(do)
        return o
    return run


def _grads(f, xg: dict, do: torch.Tensor) -> dict:
    """Every input's gradient of ``f(xg) . do`` in fp32."""
    for t in xg.values():
        t.grad = None
    f(xg).backward(do)
    return {k: t.grad.float().clone() for k, t in xg.items()}


def warm_fla(name: str, forward_only: bool) -> None:
    """Compile (and autotune, untimed) fla's kernels for op ``name`` at the benchmark shape."""
    t0 = time.perf_counter()
    x = inputs(name)
    fla = fla_op(name)
    try:
        with torch.no_grad():
            fla(x)
        if not forward_only:
            xg = {k: v.detach().requires_grad_() for k, v in x.items()}
            train(fla, xg, torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16))()
        torch.cuda.synchronize()
        print(f"warm fla {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    except Exception as e:    # fla refuses some backwards: the timed run records why
        print(f"warm fla {name}: {type(e).__name__}: {e}"[:300], flush=True)


def fla_configs() -> dict:
    """The config each of fla's autotuned kernels chose, per autotuning key (for the record:
    fla's times move with these choices). Most of fla's op kernels are heuristics wrapped
    around the autotuner: each module attribute is unwrapped down to it."""
    import sys
    from triton.runtime.autotuner import Autotuner, Heuristics
    chosen = {}
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("fla.") or mod is None:
            continue
        for attr, obj in vars(mod).items():
            while isinstance(obj, Heuristics):
                obj = obj.fn
            if isinstance(obj, Autotuner) and obj.cache:
                chosen[f"{mod_name}.{attr}"] = {str(k): str(c) for k, c in obj.cache.items()}
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ops", default="linear_attention,retnet,mamba2,gla,rwkv6,deltanet,"
                                     "gated_deltanet,kda,rwkv7")
    ap.add_argument("--forward-only", default="", help="ops timed forward only (e.g. to "
                    "spare fla's backward autotuning in a short run)")
    ap.add_argument("--warm-fla", action="store_true", help="only call fla's ops once "
                    "(forward, then forward+backward), timing nothing: run one process per "
                    "op in parallel first, and the timed run finds fla's autotuning "
                    "candidates compiled in Triton's cache")
    args = ap.parse_args()
    forward_only = set(FORWARD_ONLY) | set(filter(None, args.forward_only.split(",")))
    if args.warm_fla:
        for name in args.ops.split(","):
            warm_fla(name, forward_only=name in forward_only)
        return
    rows = []
    shape = f"B{B} T{T} H{H} K{K} V{V} bf16"
    for name in args.ops.split(","):
        attn = linforge.library.get(name)
        x = inputs(name)
        ours = lambda x: attn(**x, form="chunk")[0]  # noqa: E731
        fla = fla_op(name)
        row = {"op": name, "kind": "chunk fwd", "shape": shape,
               "linforge": measure(torch.no_grad()(lambda: ours(x)), gpu_and_host=True),
               "io_floor": io_floor(x)}
        try:
            row["fla"] = measure(torch.no_grad()(lambda: fla(x)), gpu_and_host=True)
            with torch.no_grad():
                a, b = ours(x).float(), fla(x).float()
            row["max_rel_diff_vs_fla"] = ((a - b).abs().max() / b.abs().max()).item()
        except Exception as e:
            row["fla_error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_report(rows, args.out, "chunk")    # after every row: a cut run keeps them
        if name in forward_only:
            continue
        xg = {k: v.detach().requires_grad_() for k, v in x.items()}
        do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
        row = {"op": name, "kind": "chunk fwd+bwd", "shape": shape,
               "linforge": measure(train(ours, xg, do), gpu_and_host=True)}
        try:
            row["fla"] = measure(train(fla, xg, do), gpu_and_host=True)
            g_ours, g_fla = _grads(ours, xg, do), _grads(fla, xg, do)
            row["max_rel_grad_diff_vs_fla"] = {
                k: round(((g_ours[k] - g_fla[k]).abs().max() / g_fla[k].abs().max()).item(), 5)
                for k in g_fla}
        except Exception as e:
            row["fla_error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_report(rows, args.out, "chunk")
        with open(f"{args.out}/fla_configs.json", "w") as f:
            json.dump(fla_configs(), f, indent=1)


if __name__ == "__main__":
    main()
