"""The WY kernel's unit-lower-triangular inverse alone: time and error of the forward
substitution by rows (the old one), by columns (``_unit_lower_inverse_transposed``, the WY
kernel's), the 16 x 16 diagonal blocks all at once then merged, and the 16-row blocked solve
(tf32x3 or exact fp32 dots), on the
delta rule's A = beta_t k_t . k_s (unit-norm keys, beta in (0, 2)) for every chunk of
B=4, T=4096, H=16 (4096 programs). Usage: python benchmarks/probe_inverse.py [--out DIR]
[--programs N] (on the CPU, with TRITON_INTERPRET=1, the interpreter runs a few programs,
for the errors only). ``--sass`` (no GPU needed, the device's Triton: see preflight.py)
compiles each variant for sm_90 instead and prints its SASS counts, whole and per trip of
its loop (barriers, shared memory, shuffles: what a serial step costs)."""

import argparse
import json
import os

import torch
import triton
import triton.language as tl

from linforge.codegen.chunk import (_mm, _unit_lower_inverse_block_columns,
                                   _unit_lower_inverse_diagonal_blocks,
                                   _unit_lower_inverse_through_memory,
                                   _unit_lower_inverse_transposed)


@triton.jit
def _unit_lower_inverse_by_rows(A, C: tl.constexpr):
    """(I + A)^-1 for a strictly lower-triangular [C, C] A, by forward substitution in fp32:
    row t of the inverse is e_t - sum_{s < t} A[t, s] (row s). C - 1 steps, each
    two reductions down the tile's columns (across warps): the WY kernel's inverse until
    2026-12-05."""
    r_c = tl.arange(0, C)
    X = (r_c[:, None] == r_c[None, :]).to(tl.float32)
    for t in range(1, C):
        row = (r_c == t)[:, None]
        a_t = tl.sum(tl.where(row, A, 0.0), axis=0)
        X = tl.where(row, X - tl.sum(a_t[:, None] * X, axis=0)[None, :], X)
    return X


@triton.jit
def _unit_lower_inverse_blocked(A, C: tl.constexpr, PRECISION: tl.constexpr = 3):
    """(I + A)^-1 for a strictly lower-triangular [C, C] A, in fp32 by blocks of 16 rows:
    block row i of the inverse is X_i = D_i (E_i - A_i X), with E_i its rows of I, A_i its
    rows of A, X the rows of the inverse above it (the rest still zero) and D_i the inverse
    of I plus A's 16 x 16 diagonal block i, by forward substitution. The rows are picked
    and placed by dots with 0/1 selection matrices (exact); the other dots use
    ``PRECISION`` (``_mm``: 3 is tf32x3, 2 exact fp32). 15 substitution steps on a 16 x 16
    tile per block in place of C - 1 steps on the whole [C, C] tile. (On an H200 with
    Triton 3.6 it was right alone but wrong inside the WY kernel at 8 warps.)"""
    BC: tl.constexpr = 16
    r_c = tl.arange(0, C)
    r_b = tl.arange(0, BC)
    X = tl.zeros([C, C], dtype=tl.float32)
    for i in tl.static_range(C // BC):
        E_i = (r_b[:, None] + i * BC == r_c[None, :]).to(tl.float32)    # [BC, C]
        A_i = _mm(E_i, A, PRECISION)
        D_i = _unit_lower_inverse_by_rows(_mm(A_i, tl.trans(E_i), PRECISION), BC)
        X += _mm(tl.trans(E_i), _mm(D_i, E_i - _mm(A_i, X, PRECISION), PRECISION), PRECISION)
    return X


@triton.jit
def _inverse_kernel(a_ptr, x_ptr, C: tl.constexpr, BLOCKED: tl.constexpr,
                    PRECISION: tl.constexpr):
    """One [C, C] inverse per program, by the variant BLOCKED names (0 by rows, 1 blocked,
    2 by columns, 3 diagonal blocks at once in a 3-d tile, 4 by the diagonal blocks'
    columns on the 2-d tile, 5 diagonal blocks with the rows of A read back from memory,
    the output's block serving as the buffer)."""
    r_c = tl.arange(0, C)
    p = tl.program_id(0) * C * C + r_c[:, None] * C + r_c[None, :]
    A = tl.load(a_ptr + p)
    if BLOCKED == 5:
        X = _unit_lower_inverse_through_memory(A, x_ptr, 1, C, PRECISION)
    elif BLOCKED == 4:
        X = _unit_lower_inverse_block_columns(A, C, PRECISION)
    elif BLOCKED == 3:
        X = _unit_lower_inverse_diagonal_blocks(A, C, PRECISION)
    elif BLOCKED == 2:
        X = tl.trans(_unit_lower_inverse_transposed(A, C))
    elif BLOCKED:
        X = _unit_lower_inverse_blocked(A, C, PRECISION)
    else:
        X = _unit_lower_inverse_by_rows(A, C)
    tl.store(x_ptr + p, X)


def delta_rule_products(programs: int, C: int, device) -> torch.Tensor:
    """Strictly lower A = beta_t k_t . k_s, the delta rule's, for ``programs`` chunks."""
    g = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(programs, C, 128, generator=g), dim=-1)
    beta = torch.rand(programs, C, 1, generator=g) * 2
    return torch.tril(beta * (k @ k.transpose(1, 2)), -1).to(device).contiguous()


#: (name, BLOCKED, PRECISION) of every variant
VARIANTS = (("by_rows", 0, 2), ("by_columns", 2, 2), ("diagonal_blocks_tf32x3", 3, 3),
            ("diagonal_blocks_tf32", 3, 1), ("block_columns_tf32x3", 4, 3),
            ("block_columns_tf32", 4, 1), ("through_memory_tf32x3", 5, 3),
            ("through_memory_tf32", 5, 1), ("blocked_tf32x3", 1, 3), ("blocked_ieee", 1, 2))


def print_sass():
    """Each variant compiled for sm_90 at C = 64: SASS counts, whole and per loop trip."""
    from compile_check import build_kernel
    from preflight import sass_counts, sass_loops

    for warps in (4, 8):
        for name, blocked, precision in VARIANTS:
            kernel = build_kernel(_inverse_kernel, {"a_ptr": "*fp32", "x_ptr": "*fp32"},
                                  dict(C=64, BLOCKED=blocked, PRECISION=precision), warps)
            cubin = kernel.asm["cubin"]
            print(json.dumps(dict(variant=name, num_warps=warps, whole=sass_counts(cubin),
                                  loops=sass_loops(cubin))), flush=True)


def main():
    """Print (and write to --out) one JSON line per variant: median ms and max error."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--programs", type=int, default=4096)
    parser.add_argument("--sass", action="store_true")
    args = parser.parse_args()
    if args.sass:
        return print_sass()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    programs = args.programs if device == "cuda" else 4
    rows = []
    for C, warps in ((64, 4), (64, 8), (32, 4), (128, 4)):
        A = delta_rule_products(programs, C, device)
        eye = torch.eye(C, dtype=torch.float64, device=device)
        exact = torch.linalg.inv(eye + A.double())
        for name, blocked, precision in VARIANTS:
            X = torch.empty_like(A)

            def run():
                _inverse_kernel[(programs,)](A, X, C=C, BLOCKED=blocked, PRECISION=precision,
                                             **({"num_warps": warps} if device == "cuda" else {}))
            run()
            err = ((X.double() - exact).abs().amax() / exact.abs().amax()).item()
            ms = triton.testing.do_bench(run) if device == "cuda" else None
            name_of_device = (torch.cuda.get_device_name() if device == "cuda"
                              else "cpu (interpreter)")
            rows.append(dict(C=C, num_warps=warps, variant=name, programs=programs, ms=ms,
                             rel_err=err, device=name_of_device))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "probe_inverse.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
