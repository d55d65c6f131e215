"""Random inputs and params for any library spec, in the ranges its paper uses.

One table, shared by every kernel test: decays are log decays in (log 0.5, log 0.999),
gates go through the spec's own nonlinearity, delta-rule keys are normalised by the spec.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import linforge


def _log_decay(shape, g):
    return torch.log(torch.empty(shape).uniform_(0.5, 0.999, generator=g))


def _unit(shape, g):
    x = torch.randn(shape, generator=g)
    return x / x.norm(dim=-1, keepdim=True)


# (spec, name) overrides first, then name-only defaults; each gets (shape, generator, T)
INPUTS = {
    ("gated_rfa", "g"): lambda s, g, T: torch.randn(s, generator=g),
    ("rwkv7", "a"): None,   # drawn together with b below
    "g": lambda s, g, T: _log_decay(s, g),
    "w": lambda s, g, T: _log_decay(s, g),
    "beta": lambda s, g, T: torch.sigmoid(torch.randn(s, generator=g)),
    "dt": lambda s, g, T: torch.randn(s, generator=g) * 0.5 - 1.0,
}
PARAMS = {
    ("mamba2", "A"): lambda s, g, T: -torch.exp(torch.randn(s, generator=g) * 0.5),
    ("mamba", "A"): lambda s, g, T: -torch.empty(s).uniform_(0.5, 2.0, generator=g),
    ("s4d", "A"): lambda s, g, T: -torch.empty(s).uniform_(0.5, 2.0, generator=g),
    ("s4d", "log_dt"): lambda s, g, T: torch.log(torch.empty(s).uniform_(0.01, 0.1,
                                                                           generator=g)),
    # random-feature projections scaled so W @ q is O(1), as the papers draw them
    ("gated_rfa", "W"): lambda s, g, T: torch.randn(s, generator=g) / s[-1] ** 0.5,
    ("performer", "W"): lambda s, g, T: torch.randn(s, generator=g) / s[-1] ** 0.5,
    ("cosformer", "M"): lambda s, g, T: torch.full(s, float(T + 5)),
    ("lightning_attention", "lam"): lambda s, g, T: torch.empty(s).uniform_(0.8, 0.99,
                                                                             generator=g),
    # RWKV-5's decay w = exp(-exp(omega)) drawn in (0.5, 0.999) like every other decay
    ("rwkv5", "omega"): lambda s, g, T: torch.log(-_log_decay(s, g)),
}


def make_inputs(attn, *, B: int, T: int, H: int, sizes: dict[str, int], seed: int = 0,
                dtype=torch.float32, device="cpu") -> dict[str, torch.Tensor]:
    """Inputs ``[B, T, H, dims]`` and params ``[H, dims]`` for ``attn`` in paper ranges."""
    g = torch.Generator().manual_seed(seed)
    p = attn.program
    out = {}
    for name, decl in p.inputs.items():
        shape = (B, T, H, *(sizes[d] for d in decl.dims))
        make = INPUTS.get((p.name, name), INPUTS.get(name))
        out[name] = make(shape, g, T) if make else torch.randn(shape, generator=g)
    if p.name == "rwkv7":   # a = -kappa, b = kappa * a_in with kappa a unit vector
        kappa = _unit(out["a"].shape, g)
        out["a"] = -kappa
        out["b"] = kappa * torch.sigmoid(torch.randn(kappa.shape, generator=g))
    for name, decl in p.params.items():
        shape = (H, *(sizes[d] for d in decl.dims))
        make = PARAMS.get((p.name, name))
        out[name] = make(shape, g, T) if make else torch.randn(shape, generator=g) * 0.5
    return {k: v.to(dtype=dtype, device=device) for k, v in out.items()}


def make_state(attn, *, N: int, H: int, sizes: dict[str, int], seed: int = 1,
               device="cpu") -> dict[str, torch.Tensor]:
    """A random fp32 initial state (normalizer-like vector states kept positive)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s, decl in attn.program.states.items():
        x = torch.randn(N, H, *(sizes[d] for d in decl.dims), generator=g) * 0.5
        out[s] = (x.abs() + 0.5 if len(decl.dims) == 1 else x).to(device)
    return out


def spec_sizes(attn, K: int = 12, V: int = 10, M: int = 8) -> dict[str, int]:
    """Dim sizes for a spec: K, V, M as given; declared dims from their size expressions."""
    sizes = {"K": K, "V": V, "M": M}
    for d, expr in attn.program.dims.items():
        if expr is not None:
            sizes[d] = int(expr.subs({s: sizes[str(s)] for s in expr.free_symbols}))
    return sizes


DESIGN_SPECS = Path(__file__).parent / "specs" / "design.lin"


def all_specs() -> dict[str, object]:
    """Every library spec, and every DESIGN.md spec as ``design:<name>``."""
    out = {n: linforge.library.get(n) for n in linforge.library.names()}
    out.update({f"design:{n}": a for n, a in linforge.load(DESIGN_SPECS).items()})
    return out


def kernel_specs() -> dict[str, object]:
    """``all_specs()`` less the specs that no generated kernel runs yet: those whose
    ``analysis.kernel_blockers`` name a construct the kernels do not lower (memory inputs,
    position-indexed params, reductions over heads or tokens, the length T). The kernel tests
    iterate over these; the reference interpreter and tests/library cover the others."""
    return {n: a for n, a in all_specs().items()
            if not a.analysis.kernel_blockers and not a.program.memory}


def kernel_names() -> list[str]:
    """The library names among ``kernel_specs()``."""
    return [n for n in linforge.library.names()
            if not linforge.library.get(n).analysis.kernel_blockers
            and not linforge.library.get(n).program.memory]


def kernel_sizes(attn) -> dict[str, int]:
    """Small sizes for CPU kernel tests: K != V, neither a power of two (Based's feature
    dim 1 + K + K*K grows fast, so its K is smaller)."""
    return spec_sizes(attn, K=6 if attn.name == "based" else 12, V=10)


__all__ = ["make_inputs", "make_state", "spec_sizes", "all_specs", "kernel_specs",
           "kernel_names", "kernel_sizes", "linforge", "F"]
