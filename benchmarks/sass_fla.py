"""Compile flash-linear-attention's (fla 0.6.0) gated-delta-rule Triton kernels for an sm_90
(Hopper) target on a machine without a GPU, and print each kernel's registers, local memory
(spills), shared memory, whole-kernel SASS counts and the SASS counts of each loop body (one
trip: for the ordered state kernels, one chunk step), to compare with ours per chunk step.

Usage (no GPU needed; Triton 3.6, torch and fla 0.6.0 in the virtualenv; do not interpret):

    TRITON_INTERPRET=0 PYTHONPATH=/tmp/pp /tmp/t36/bin/python benchmarks/sass_fla.py [NAME...]

prints one JSON line per kernel and autotune config (NAME: only kernels whose name contains
it). Shapes: B=1, T=4096, H=HV=16, K=V=128, bf16 inputs, chunk BT=64, no varlen, a scalar fp32
gate per head and token (USE_G), no initial state, a final state (gradient). fla's autotune
lists depend on the GPU it finds (none here), so the lists below are the decorators' lists as
they evaluate on an H100 (check_shared_mem() True for every arch up to Hopper, IS_NVIDIA_HOPPER,
not Blackwell, not Intel, IS_TF32_SUPPORTED, FLA_USE_TMA unset: no TMA); heuristics' constexprs
are set by hand from the decorators' lambdas. Each kernel's inner JITFunction is compiled with
``warmup`` and CPU tensors, the fake driver reporting a cuda sm_90 target.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="sass_fla_"))
os.environ.pop("TRITON_F32_DEFAULT", None)   # fla leaves tf32 on for Hopper
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from compile_check import _resources  # noqa: E402
from preflight import _fake_driver, sass_counts, sass_loops  # noqa: E402

import fla.ops.common.chunk_delta_h as delta_h  # noqa: E402
import fla.ops.common.chunk_o as chunk_o  # noqa: E402
import fla.ops.common.chunk_scaled_dot_kkt as kkt  # noqa: E402
import fla.ops.gated_delta_rule.chunk_fwd as gdn_fwd  # noqa: E402
import fla.ops.gated_delta_rule.wy_fast as wy  # noqa: E402
import fla.ops.utils.solve_tril  # noqa: E402,F401

solve = sys.modules["fla.ops.utils.solve_tril"]   # the package re-exports a function of that name

B, T, H, K, V, BT = 1, 4096, 16, 128, 128, 64
NT = T // BT
# on Hopper, fla's fused kkt+solve kernel uses tf32 for its block merge (IS_TF32_SUPPORTED)
gdn_fwd.SOLVE_TRIL_DOT_PRECISION = tl.constexpr("tf32")


def bf(*shape):
    return torch.empty(*shape, dtype=torch.bfloat16)


def f32(*shape):
    return torch.empty(*shape, dtype=torch.float32)


def cfgs(warps, stages, **blocks):
    """(kwargs, num_warps, num_stages) for every combination, as the decorators list them."""
    [(key, values)] = blocks.items() if blocks else [(None, [None])]
    return [({key: b} if key else {}, w, s) for w in warps for s in stages for b in values]


qk, vv, gate, beta = bf(B, T, H, K), bf(B, T, H, V), f32(B, T, H), bf(B, T, H)
common = dict(cu_seqlens=None, T=T, H=H, K=K, BT=BT, IS_VARLEN=False)
CASES = [
    ("chunk_gated_delta_rule_fwd_kernel_h_blockdim64", delta_h, dict(
        k=qk, v=vv, w=bf(B, T, H, K), v_new=bf(B, T, H, V), g=gate, gk=None,
        h=bf(B, NT, H, K, V), h0=None, ht=f32(B, H, K, V), chunk_offsets=None, HV=H, V=V,
        USE_G=True, USE_GK=False, USE_INITIAL_STATE=False, STORE_FINAL_STATE=True,
        SAVE_NEW_VALUE=True, STATE_V_FIRST=False),
     cfgs([2, 4], [2, 3, 4], BV=[32, 64]), lambda c: (V // c["BV"] * B * H,)),
    ("chunk_gated_delta_rule_bwd_kernel_dhu_blockdim64", delta_h, dict(
        q=qk, k=qk, w=bf(B, T, H, K), g=gate, gk=None, dht=f32(B, H, K, V), dh0=None,
        do=vv, dh=bf(B, NT, H, K, V), dv=bf(B, T, H, V), dv2=bf(B, T, H, V),
        chunk_offsets=None, scale=K ** -0.5, HV=H, V=V, USE_G=True, USE_GK=False,
        USE_INITIAL_STATE=False, USE_FINAL_STATE_GRADIENT=True, STATE_V_FIRST=False),
     cfgs([2, 4], [2, 3, 4], BV=[32, 64]), lambda c: (V // c["BV"] * B * H,)),
    ("merge_16x16_to_64x64_inverse_kernel", solve, dict(
        A=f32(B, T, H, BT), Ai=bf(B, T, H, BT), chunk_indices=None, USE_TMA=False,
        DOT_PRECISION="ieee"),
     cfgs([2, 4, 8], [2, 3, 4, 5]), lambda c: (NT, B * H)),
    ("recompute_w_u_fwd_kernel", wy, dict(
        k=qk, v=vv, beta=beta, w=bf(B, T, H, K), u=bf(B, T, H, V), A=bf(B, T, H, BT), g=gate,
        chunk_indices=None, HV=H, V=V, BK=64, BV=64, USE_G=True),
     cfgs([2, 4, 8], [2, 3, 4]), lambda c: (NT, B * H)),
    ("prepare_wy_repr_bwd_kernel", wy, dict(
        k=qk, v=vv, beta=beta, g=gate, A=bf(B, T, H, BT), dw=bf(B, T, H, K), du=bf(B, T, H, V),
        dk=bf(B, T, H, K), dv=bf(B, T, H, V), db=bf(B, T, H), dg=f32(B, T, H),
        chunk_indices=None, HV=H, V=V, BK=64, BV=64, USE_G=True),
     cfgs([2, 4], [2, 3, 4]), lambda c: (NT, B * H)),
    ("chunk_fwd_kernel_o", chunk_o, dict(
        q=qk, k=qk, v=vv, h=bf(B, NT, H, K, V), g=gate, g_gamma=None, o=bf(B, T, H, V),
        chunk_indices=None, scale=K ** -0.5, HV=H, V=V, USE_G=True, USE_G_GAMMA=False,
        STATE_V_FIRST=False),
     [({"BK": 128, "BV": 128}, 8, 3), ({"BK": 64, "BV": 64}, 4, 3),
      ({"BK": 32, "BV": 32}, 2, 3)], lambda c: (V // c["BV"] * NT, B * H)),
    ("chunk_scaled_dot_kkt_fwd_kernel", kkt, dict(
        k=qk, g=gate, beta=beta, A=f32(B, T, H, BT), chunk_indices=None, HV=H, USE_G=True),
     [({"BK": bk}, w, s) for bk in [32, 64, 128] for w in [2, 4, 8] for s in [2, 3, 4]],
     lambda c: (NT, B * H)),
    # not in the brief's list: what fla 0.6.0 actually runs on NVIDIA at BT=64 in place of
    # chunk_scaled_dot_kkt_fwd + solve_tril (chunk_gated_delta_rule_fwd_intra)
    ("chunk_gated_delta_rule_fwd_kkt_solve_kernel", gdn_fwd, dict(
        k=qk, g=gate, beta=beta, A=bf(B, T, H, BT), chunk_indices=None, HV=H, BC=16,
        USE_G=True),
     [({"BK": bk}, w, 3) for bk in [32, 64] for w in [1, 2, 4]], lambda c: (NT, B * H)),
]


def main() -> None:
    triton.runtime.driver.set_active(_fake_driver())
    only = sys.argv[1:]
    for name, module, args, configs, grid in CASES:
        if only and not any(o in name for o in only):
            continue
        fn = getattr(module, name)
        while not isinstance(fn, JITFunction):      # heuristics -> autotuner -> jit
            fn = fn.fn
        kw = {k: v for k, v in {**common, **args}.items() if k in fn.arg_names}
        for extra, warps, stages in configs:
            row = dict(kernel=name, config=dict(extra, num_warps=warps, num_stages=stages))
            try:
                kern = fn.warmup(**kw, **extra, grid=grid(extra), num_warps=warps,
                                 num_stages=stages)
                cubin = kern.asm["cubin"]
                res = dict(p.split(":") for p in _resources(cubin).split() if ":" in p)
                row.update(regs=int(res["REG"]), local=int(res["LOCAL"]),
                           stack=int(res["STACK"]), shared=kern.metadata.shared,
                           sass=sass_counts(cubin), loops=sass_loops(cubin))
            except Exception as e:  # noqa: BLE001  (report it, go on)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
