"""Compile the chunked kernels for a Hopper GPU on a machine without one (Triton's own
ptxas), and print each kernel's registers, spills and shared memory: catches compile errors
the interpreter does not see, and register pressure, before any device time is spent.

Usage: python benchmarks/compile_check.py [--K 128] [--strict] [--decay 0|1|2] (no CUDA
needed; do not set TRITON_INTERPRET). Run it with the device's Triton (3.6; its wheel is on
this machine's disk: a virtualenv with torch==2.13.0 triton==3.6.0): shared memory differs
between versions (the low-rank backward at 32 V lanes: 248 KB with 3.6, 152 KB with 3.9).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402  (before linforge, so that it compiles instead of interpreting)
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from linforge.codegen import chunk  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def build_kernel(fn, signature: dict, constexprs: dict, num_warps: int = 4,
                 num_stages: int = 1):
    """``fn`` compiled for sm_90 (its pointer and scalar types in ``signature``)."""
    sig = dict(signature)
    for name, value in constexprs.items():
        sig[name] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v
                                                      for k, v in constexprs.items()})
    return triton.compile(src, target=TARGET, options=dict(num_warps=num_warps,
                                                           num_stages=num_stages))


def build(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 1):
    """Compile ``fn`` for sm_90 and return (registers, spills, shared bytes)."""
    k = build_kernel(fn, signature, constexprs, num_warps, num_stages)
    return k.metadata.shared, _resources(k.asm["cubin"])


def cuobjdump(cubin: bytes, flag: str) -> str:
    """What Triton's bundled cuobjdump prints for a compiled kernel with ``flag``
    (``-res-usage``, ``-sass``)."""
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def _resources(cubin: bytes) -> str:
    """cuobjdump's resource line (registers, stack, spills) of a compiled kernel."""
    return " ".join(line.strip() for line in cuobjdump(cubin, "-res-usage").splitlines()
                    if "REG" in line)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--strict", action="store_true")
    ap.add_argument("--BK", type=int, default=64)
    ap.add_argument("--decay", type=int, default=2, help="DECAY of the shared kernels")
    ap.add_argument("--low-rank", action="store_true", help="the delta kernels' LOW_RANK mode "
                    "and the output kernel's SECOND term (RWKV-7)")
    ap.add_argument("--norm", action="store_true", help="a normalizer riding along (NORM)")
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--num-stages", type=int, default=1)
    args = ap.parse_args()
    BK = args.BK
    K = args.K
    P, F = "*bf16", "*fp32"
    cases = {
        "chunk_diag_scores_kernel": (chunk.chunk_diag_scores_kernel,
            dict(q_ptr=P, k_ptr=P, b_ptr="*fp32", A_ptr=P, chunk_table_ptr="*i64"),
            dict(H=16, K=K, C=64, STRICT=args.strict, DOT=0, SUB=16,
                 KP=K, SPREAD=60.0)),
        "chunk_diag_grads_kernel": (chunk.chunk_diag_grads_kernel,
            dict(q_ptr=P, k_ptr=P, b_ptr="*fp32", dA_ptr=P, last_ptr="*fp32",
                 chunk_table_ptr="*i64", scale="fp32", dq_ptr=P, dk_ptr=P, dlam_ptr="*fp32"),
            dict(H=16, K=K, BK=BK, C=64, STRICT=args.strict, DOT=0, SUB=16, SPREAD=60.0)),
        "chunk_grads_kernel": (chunk.chunk_grads_kernel,
            dict(q_ptr=P, k_ptr=P, v_ptr=P, lam_ptr="*fp32", dy_ptr=P, ckpt_ptr=P,
                 dckpt_ptr="*fp32", chunk_table_ptr="*i64", A_ptr=P, last_ptr="*fp32",
                 scale="fp32", dq_ptr=P, dk_ptr=P, dv_ptr=P, dlam_ptr="*fp32", dycol_ptr=F,
                 zckpt_ptr=F, dzckpt_ptr=F),
            dict(H=16, K=K, V=128, BK=BK, BV=BK, NK=K // BK, NV=128 // BK, C=64,
                 DECAY=args.decay, STRICT=args.strict, DOT=0, PARALLEL=False,
                 NORM=args.norm)),
        "chunk_output_kernel": (chunk.chunk_output_kernel,
            dict(q_ptr=P, k_ptr=P, v_ptr=P, lam_ptr="*fp32", y_ptr=P, ckpt_ptr=P,
                 chunk_table_ptr="*i64", A_ptr=P, scale="fp32", v2_ptr=P, A2_ptr=P,
                 zckpt_ptr=F, ycol_ptr=F),
            dict(H=16, K=K, V=128, BK=BK, BV=BK, NK=K // BK, NV=128 // BK, C=64,
                 DECAY=args.decay, STRICT=args.strict, DOT=0, SUB=16, PARALLEL=False,
                 SECOND=args.low_rank, NORM=args.norm)),
        "chunk_states_kernel": (chunk.chunk_states_kernel,
            dict(k_ptr=P, v_ptr=P, lam_ptr=F, s0_ptr=F, sT_ptr=F, ckpt_ptr=P,
                 cu_seqlens_ptr="*i32", chunk_offsets_ptr="*i64", T="i32", w_ptr=F, u_ptr=F,
                 x_ptr=P, z0_ptr=F, zT_ptr=F, zckpt_ptr=F),
            dict(H=16, K=K, V=128, BK=BK, BV=64, NV=2, C=64, DECAY=args.decay,
                 USE_INITIAL_STATE=True, IS_VARLEN=False, DOT=0, NORM=args.norm)),
        "chunk_dstates_kernel": (chunk.chunk_dstates_kernel,
            dict(q_ptr=P, lam_ptr=F, dy_ptr=P, dsT_ptr=F, ds0_ptr=F, dckpt_ptr=F,
                 cu_seqlens_ptr="*i32", chunk_offsets_ptr="*i64", T="i32", k_ptr=P, w_ptr=F,
                 A_ptr=F, du_ptr=F, dycol_ptr=F, dzT_ptr=F, dz0_ptr=F, dzckpt_ptr=F),
            dict(H=16, K=K, V=128, BK=BK, BV=64, NV=2, C=64, DECAY=args.decay,
                 STRICT=args.strict, USE_FINAL_STATE_GRAD=True, IS_VARLEN=False, DOT=0,
                 NORM=args.norm)),
        "delta_wy_kernel": (chunk.delta_wy_kernel,
            dict(k_ptr=P, v_ptr=P, beta_ptr=F, lam_ptr=F, kk_ptr=F, w_ptr=F, u_ptr=F,
                 inv_ptr=F, chunk_table_ptr="*i64", wk_ptr=F, ckpt_ptr=F),
            dict(H=16, K=K, V=128, BK=K, BV=32, NV=4, C=64, DECAY=args.decay, DOT=1,
                 STORE_INVERSE=True, LOW_RANK=args.low_rank, FROM_STATES=True)),
        "chunk_states_kernel (delta)": (chunk.chunk_states_kernel,
            dict(k_ptr=P, v_ptr=P, lam_ptr=F, s0_ptr=F, sT_ptr=F, ckpt_ptr=F,
                 cu_seqlens_ptr="*i32", chunk_offsets_ptr="*i64", T="i32", w_ptr=F, u_ptr=F,
                 x_ptr=P, z0_ptr=F, zT_ptr=F, zckpt_ptr=F),
            dict(H=16, K=K, V=128, BK=K, BV=32, NV=4, C=64, DECAY=args.decay,
                 USE_INITIAL_STATE=True, IS_VARLEN=False, DOT=1, DELTA=True,
                 LOW_RANK=args.low_rank)),
        "chunk_dstates_kernel (delta)": (chunk.chunk_dstates_kernel,
            dict(q_ptr=P, lam_ptr=F, dy_ptr=F, dsT_ptr=F, ds0_ptr=F, dckpt_ptr=F,
                 cu_seqlens_ptr="*i32", chunk_offsets_ptr="*i64", T="i32", k_ptr=P, w_ptr=F,
                 A_ptr=F, du_ptr=F, dycol_ptr=F, dzT_ptr=F, dz0_ptr=F, dzckpt_ptr=F),
            dict(H=16, K=K, V=128, BK=K, BV=32, NV=4, C=64, DECAY=args.decay, STRICT=False,
                 USE_FINAL_STATE_GRAD=True, IS_VARLEN=False, DOT=1, DELTA=True)),
        "delta_wy_bwd_kernel": (chunk.delta_wy_bwd_kernel,
            dict(k_ptr=P, v_ptr=P, beta_ptr=F, lam_ptr=F, kk_ptr=F, inv_ptr=F, w_ptr=F,
                 du_ptr=F, ckpt_ptr=F, chunk_table_ptr="*i64", dk_ptr=F, dv_ptr=F,
                 dbeta_ptr=F, dlam_ptr=F, dkk_ptr=F),
            dict(H=16, K=K, V=128, BK=K, BV=32, NV=4, C=64, DECAY=args.decay, DOT=1)),
        "low_rank_state_grads_kernel": (chunk.low_rank_state_grads_kernel,
            dict(q_ptr=P, k_ptr=P, v_ptr=P, x_ptr=P, lam_ptr=F, dy_ptr=F, ckpt_ptr=F,
                 dckpt_ptr=F, wy_ptr=F, u_ptr=F, du_ptr=F, inv_ptr=F, chunk_table_ptr="*i64",
                 dq_ptr=F, dk_ptr=F, dw_ptr=F, dx_ptr=F, last_ptr=F, dwx_ptr=F),
            dict(H=16, K=K, V=128, BK=BK, BV=32, NV=4, C=64, DOT=1)),
        "low_rank_pair_grads_kernel": (chunk.low_rank_pair_grads_kernel,
            dict(k_ptr=P, v_ptr=P, lam_ptr=F, dy_ptr=F, dckpt_ptr=F, u_ptr=F, du_ptr=F,
                 inv_ptr=F, chunk_table_ptr="*i64", qk_ptr=F, wk_ptr=F, dqx_ptr=F, dqk_ptr=F,
                 dwx_ptr=F, dwk_ptr=F, dv_ptr=F),
            dict(H=16, K=K, V=128, BK=K, BV=32, NV=4, C=64, DOT=1)),
        "chunk_cumsum_kernel": (chunk.chunk_cumsum_kernel,
            dict(lam_ptr="*fp32", b_ptr="*fp32", chunk_table_ptr="*i64"),
            dict(H=16, K=K, BK=BK, C=64)),
    }
    for name, (fn, sig, cx) in cases.items():
        shared, resources = build(fn, sig, cx, args.num_warps, args.num_stages)
        print(f"{name}: shared={shared} {resources}")


if __name__ == "__main__":
    main()
