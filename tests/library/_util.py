"""Shared helpers for the library tests: random inputs in paper ranges, comparison, gradcheck."""

from __future__ import annotations

import torch

import linforge
from linforge.ir.interpret import run_reference

DTYPE = torch.float64
TOL = 1e-9   # float64 reference interpreter vs independent float64 reference


def randn(*shape, scale: float = 1.0, seed_offset: int = 0) -> torch.Tensor:
    """Standard normal float64 tensor (scaled)."""
    return torch.randn(*shape, dtype=DTYPE) * scale


def log_decay(*shape, low: float = 0.5, high: float = 0.999) -> torch.Tensor:
    """log of a decay drawn uniformly in (low, high) -- a log decay as fla passes it."""
    return torch.log(torch.empty(*shape, dtype=DTYPE).uniform_(low, high))


def l2normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| over the last dim."""
    return x / x.norm(dim=-1, keepdim=True)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL, what=""):
    """Max abs error relative to the max magnitude of ``expected`` below ``tol``."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = expected.abs().max().clamp_min(1.0)
    err = ((actual - expected).abs().max() / scale).item()
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"


def global_normalized_attention(phi_q, phi_k, v, eps):
    """Noncausal linear attention in matrix form over feature-mapped ``[B, T, H, *]`` inputs:
    ``o = phi(Q) (phi(K)^T V) / (phi(Q) sum phi(K) + eps)``; returns ``(o, K^T V, sum K)``."""
    Q, Kf, Vh = phi_q.transpose(1, 2), phi_k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, *]
    kv = Kf.transpose(-1, -2) @ Vh                                              # [B, H, K, V]
    ksum = Kf.sum(-2)                                                           # [B, H, K]
    o = (Q @ kv) / ((Q @ ksum[..., None]) + eps)
    return o.transpose(1, 2), kv, ksum


def run_spec(name: str, tensors: dict, initial_state=None, output_final_state=True):
    """The library spec ``name`` through the reference interpreter in float64."""
    attn = linforge.library.get(name)
    return attn.reference(initial_state=initial_state, output_final_state=output_final_state,
                          **tensors)


def run_cross(attn, inputs: dict, memory: dict, params: dict | None = None, **kw):
    """A spec with memory inputs (cross-attention) through the float64 reference interpreter,
    sizes read off the shapes (independent of ``Attention.bind``).
    ``kw``: initial_state, cu_seqlens, cu_seqlens_memory."""
    p, params = attn.program, params or {}
    sizes: dict[str, int] = {}
    for table, tensors, lead in ((p.inputs, inputs, 3), (p.memory, memory, 3),
                                 (p.params, params, 1)):
        for n, decl in table.items():
            sizes["H"] = tensors[n].shape[lead - 1]
            sizes.update(zip(decl.dims, tensors[n].shape[lead:]))
    return run_reference(p, inputs, params, sizes, memory=memory, dtype=DTYPE, **kw)


def gradcheck_spec(name: str, tensors: dict, initial_state: dict | None = None) -> bool:
    """torch.autograd.gradcheck of o (and the final states) w.r.t. every tensor and state."""
    attn = linforge.library.get(name)
    names = list(tensors)
    state_names = list(initial_state or {})
    leaves = [tensors[n].detach().clone().requires_grad_() for n in names]
    leaves += [initial_state[s].detach().clone().requires_grad_() for s in state_names]

    def fn(*xs):
        kw = dict(zip(names, xs[:len(names)]))
        init = dict(zip(state_names, xs[len(names):])) or None
        o, final = attn.reference(initial_state=init, output_final_state=True, **kw)
        return (o, *final.values())

    return torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)


def check_global_state_spec(name: str, reference) -> None:
    """A noncausal spec whose state is K^T V with the normalizer K^T 1 (states S and z):
    its output and final states against ``reference(q, k, v) -> (o, K^T V, K^T 1)``,
    then gradcheck (keys positive, so that no query reads an all-zero normalizer)."""
    torch.manual_seed(0)
    B, T, H, K, V = 2, 13, 2, 6, 5
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    o, final = run_spec(name, dict(q=q, k=k, v=v))
    o_ref, kv, ksum = reference(q, k, v)
    assert_close(o, o_ref, what="o")
    assert_close(final["S"], kv, what="S")
    assert_close(final["z"], ksum, what="z")
    torch.manual_seed(1)
    B, T, H, K, V = 1, 3, 1, 2, 3
    t = dict(q=randn(B, T, H, K), k=randn(B, T, H, K).abs() + 0.1, v=randn(B, T, H, V))
    assert gradcheck_spec(name, t)
