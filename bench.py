"""Time a compiled spec's kernels (``linforge bench SPEC``), beside fla's kernels for the same
math when fla is importable and a CUDA GPU is present.

Measured per kernel form (as in ``check``: every form the call accepts; forms without a
kernel are listed as such): the forward without gradients, forward plus backward, and the
decode step (one token for each of the B sequences). On a GPU each time is the median of
``triton.testing.do_bench``; on the CPU the kernels run in Triton's interpreter, so the
numbers say nothing about kernel speed (the table says so), and fla is not run.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .api import Attention
from .check import KERNEL_FORMS, Shape, random_call

#: sizes when none are given: DESIGN.md's performance bar on a GPU, a toy on the CPU
GPU_SHAPE = Shape(B=4, T=4096, H=16, K=128, V=128)
CPU_SHAPE = Shape(B=1, T=32, H=2, K=16, V=16)


@dataclass
class Timing:
    """One line of the bench table (milliseconds; None: not measured)."""

    what: str
    form: str
    linforge_ms: float | None
    fla_ms: float | None = None
    note: str = ""


# ---------------------------------------------------------------------- fla equivalents
def _fla_gla(form):
    from fla.ops.gla import chunk_gla, fused_recurrent_gla
    op = chunk_gla if form == "chunk" else fused_recurrent_gla
    return lambda x: op(x["q"], x["k"], x["v"], gk=x["g"])[0]


def _fla_rwkv6(form):
    from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6
    op = chunk_rwkv6 if form == "chunk" else fused_recurrent_rwkv6
    return lambda x: op(x["r"], x["k"], x["v"], x["w"], x["u"], scale=1.0)[0]


def _fla_retnet(form):
    from fla.ops.retention import chunk_retention, fused_recurrent_retention
    op = chunk_retention if form == "chunk" else fused_recurrent_retention
    return lambda x: op(x["q"], x["k"], x["v"])[0]


def _fla_deltanet(form):
    from fla.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule
    op = chunk_delta_rule if form == "chunk" else fused_recurrent_delta_rule
    return lambda x: op(x["q"], x["k"], x["v"], beta=x["beta"],
                        use_qk_l2norm_in_kernel=True)[0]


def _fla_gated_deltanet(form):
    from fla.ops.gated_delta_rule import (chunk_gated_delta_rule,
                                          fused_recurrent_gated_delta_rule)
    op = chunk_gated_delta_rule if form == "chunk" else fused_recurrent_gated_delta_rule
    return lambda x: op(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"],
                        use_qk_l2norm_in_kernel=True)[0]


def _fla_linear_attention(form):
    if form != "chunk":
        raise NotImplementedError("fla's linear attention with a normalizer is chunked only")
    from fla.ops.linear_attn import chunk_linear_attn
    return lambda x: chunk_linear_attn(F.elu(x["q"]) + 1, F.elu(x["k"]) + 1, x["v"],
                                       scale=1.0, normalize=True)[0]


def _fla_mamba2(form):
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    op = chunk_simple_gla if form == "chunk" else fused_recurrent_simple_gla

    def run(x):
        dt = F.softplus(x["dt"] + x["dt_bias"])
        o = op(x["C"], x["B"], x["x"] * dt[..., None].to(x["x"].dtype), g=dt * x["A"],
               scale=1.0)[0]
        return o + x["D"][:, None] * x["x"]
    return run


#: library spec -> (form -> fla op computing the same o from the spec's tensors)
FLA_OPS: dict[str, Callable] = {
    "gla": _fla_gla, "rwkv6": _fla_rwkv6, "retnet": _fla_retnet, "deltanet": _fla_deltanet,
    "gated_deltanet": _fla_gated_deltanet, "linear_attention": _fla_linear_attention,
    "mamba2": _fla_mamba2,
}


def fla_status(name: str, device) -> tuple[bool, str]:
    """Whether fla can run beside ``name`` here, and why not."""
    if name not in FLA_OPS:
        return False, "no fla equivalent known for this spec"
    if importlib.util.find_spec("fla") is None:
        return False, "fla not installed"
    if torch.device(device).type != "cuda":
        return False, "fla needs a CUDA GPU"
    return True, ""


# ---------------------------------------------------------------------- timing
def measure(fn: Callable[[], object], device, reps: int = 3) -> float:
    """Median milliseconds of ``fn()`` (``triton.testing.do_bench`` on a GPU)."""
    if torch.device(device).type == "cuda":
        import triton

        return float(triton.testing.do_bench(fn))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _train(fn, x: dict):
    leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in x.items()}

    def run():
        o = fn(leaves)
        o.backward(torch.ones_like(o))
    return run


def bench(attn: Attention, shape: Shape, *, dtype=torch.bfloat16, device="cuda",
          progress=None, reps: int = 3) -> list[Timing]:
    """Time every kernel form of ``attn`` (forward, forward + backward) and the decode
    step; beside fla when ``fla_status`` allows."""
    x, _ = random_call(attn, shape, dtype=dtype, device=device)
    fla_ok, fla_why = fla_status(attn.name, device)
    rows = []
    for form in KERNEL_FORMS:
        ours = lambda t, form=form: attn(**t, form=form)[0]  # noqa: E731
        if progress:
            progress(f"{form}: generating and compiling")
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                ours(x)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
        except (NotImplementedError, ValueError) as e:
            rows.append(Timing("forward", form, None, note="no kernel: " + str(e).split(";")[0]))
            continue
        first = time.perf_counter() - t0
        fla = None
        note = fla_why
        if fla_ok:
            try:
                fla = FLA_OPS[attn.name](form)
            except (ImportError, NotImplementedError) as e:
                note = f"fla: {e}"
        if progress:
            progress(f"{form}: timing")
        forward_row = len(rows)
        for what, make in (("forward", lambda f: torch.no_grad()(lambda: f(x))),
                           ("forward+backward", lambda f: _train(f, x))):
            try:
                ms = measure(make(ours), device, reps)
            except (NotImplementedError, ValueError, RuntimeError) as e:
                rows.append(Timing(what, form, None, note=str(e).split(";")[0][:80]))
                continue
            fla_ms = None
            if fla is not None:
                try:
                    fla_ms = measure(make(fla), device, reps)
                except Exception as e:  # fla refuses some configurations: say so, go on
                    note = f"fla: {type(e).__name__}: {str(e)[:60]}"
            rows.append(Timing(what, form, ms, fla_ms,
                               note if what == "forward" and not fla_ms else ""))
        row = rows[forward_row]
        row.note = "; ".join(filter(None, (row.note, f"first call {first:.2f} s (generate + "
                                                     "compile)")))
    if not attn.program.noncausal:
        rows.append(_bench_step(attn, x, device, reps))
    return rows


def _bench_step(attn: Attention, x: dict, device, reps: int) -> Timing:
    p = attn.program
    one = {k: (v[:, 0].contiguous() if k in p.inputs else v) for k, v in x.items()}
    try:
        _, state = attn(**x, output_final_state=True, form="recurrent")
        ms = measure(lambda: attn.step(state, inplace=True, **one), device, reps)
    except (NotImplementedError, ValueError) as e:
        return Timing("decode step", "recurrent", None, note=str(e).split(";")[0])
    B = next(iter(x.values())).shape[0]
    return Timing("decode step", "recurrent", ms, note=f"one token x {B} sequences, in place")


__all__ = ["CPU_SHAPE", "FLA_OPS", "GPU_SHAPE", "Timing", "bench", "fla_status", "measure"]
