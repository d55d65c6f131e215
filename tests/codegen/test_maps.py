"""Fused per-token maps (codegen/maps.py): the generated kernel of a map equals the same map
evaluated by torch ops, forward and gradients of every input and param (Triton's CPU
interpreter, fp32 and bf16)."""

import pytest
import torch

import linforge
from linforge.codegen.maps import fused_map, fused_sum, run_map
from linforge.ir.interpret import StepEvaluator

SPEC = """
attention probe
    inputs q[K], k[K], v[V], dt, w[K]
    params A, dt_bias, u[K]
    state  S[K, V]
    a = {expr}
    S = S + outer(a * k, v)
    o = q @ S
"""

# map of the probe's inputs -> the dim it spans ("K" or "" for one value per token and head)
CASES = {
    "elu(q) + 1": "K",
    "softplus(dt + dt_bias) * A": "",
    "exp(w) * u + (h + 1) * dt": "K",
    "relu(q) ** 2 / K": "K",
    "sigmoid(q) * tanh(w - u)": "K",
}
# sums over a dim of such a map (RWKV-6's bonus), reduced in the kernel: the summed dim
SUMS = {"sum(q * u * exp(w))": "K", "sum(sigmoid(q) * dt)": "K"}
B, T, H, K, V = 2, 5, 3, 12, 8


def _tensors(dtype):
    g = torch.Generator().manual_seed(0)
    x = {("input", "q"): torch.randn(B, T, H, K, generator=g),
         ("input", "k"): torch.randn(B, T, H, K, generator=g),
         ("input", "v"): torch.randn(B, T, H, V, generator=g),
         ("input", "dt"): torch.randn(B, T, H, generator=g),
         ("input", "w"): torch.randn(B, T, H, K, generator=g),
         ("param", "A"): -torch.rand(H, generator=g),
         ("param", "dt_bias"): torch.randn(H, generator=g),
         ("param", "u"): torch.randn(H, K, generator=g)}
    return {n: t.to(dtype).requires_grad_() for n, t in x.items()}


def _node(expr):
    attn = linforge.compile(SPEC.format(expr=expr))
    (u,) = attn.program.updates
    # S + outer(a * k, v): the map is the first factor of the outer product's left side
    outer = next(n for n in u.value.walk() if n.op.value == "outer")
    node = outer.args[0].args[0]
    assert node.op.value not in ("input", "param"), node   # the map itself, not a leaf
    return node


def _torch_value(node, x):
    values = {key: (t.float().reshape(B * T, H, *t.shape[3:]) if key[0] == "input"
                    else t.float().unsqueeze(0)) for key, t in x.items()}
    values["h"] = torch.arange(H, dtype=torch.float32).reshape(1, H)
    ev = StepEvaluator(values, {"K": K, "V": V, "H": H}, torch.float32, "cpu")
    out = ev(node)
    return out.expand(B * T, H, *out.shape[2:]).reshape(B, T, H, *out.shape[2:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("expr", [*CASES, *SUMS])
def test_fused_map_equals_torch_forward_and_gradients(expr, dtype):
    node = _node(expr)
    sizes = {"K": K, "V": V, "H": H, "B": B, "T": T}
    plan = fused_map(node, sizes) if expr in CASES else fused_sum(node, sizes)
    assert plan is not None, expr
    shape = (B, T, H, *([K] if CASES.get(expr) or SUMS.get(expr) else []))
    x = _tensors(dtype)
    ours = run_map(plan, x, shape, torch.float32)
    g = torch.randn(shape[:3] if expr in SUMS else shape,
                    generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((ours * g).sum(), list(x.values()), allow_unused=True)
    x_ref = _tensors(dtype)
    ref = _torch_value(node, x_ref)
    grads_ref = torch.autograd.grad((ref * g).sum(), list(x_ref.values()), allow_unused=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ours.shape == ref.shape
    assert ((ours - ref).abs().max() / ref.abs().max()) < tol
    for (name, _), a, b in zip(x, grads, grads_ref):
        if b is None:
            assert a is None or a.abs().max() == 0, name
            continue
        assert ((a.float() - b.float()).abs().max() / b.float().abs().max()) < tol, (expr, name)


def test_maps_that_do_not_qualify_stay_in_torch():
    for expr in ("l2norm(q)", "q * sum(k)"):
        assert fused_map(_node(expr), {"K": K, "V": V, "H": H}) is None, expr


def test_l2norm_kernel_matches_torch_values_and_gradients():
    """``scale * l2norm(x)`` (the delta rules' q and k) as one kernel pair: values and the
    gradient against float64 torch, a zero row included (eps keeps it finite), D not a
    power of two, and a bf16 output."""
    from linforge.codegen.maps import run_l2norm
    from linforge.ir.nodes import L2NORM_EPS

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 7, 3, 20, generator=g)
    x[0, 0, 0] = 0.0
    w = torch.randn(x.shape, generator=g)
    xs = x.clone().requires_grad_()
    out = run_l2norm(xs, 0.25, torch.float32)
    (out * w).sum().backward()
    xd = x.double().requires_grad_()
    ref = 0.25 * xd / torch.sqrt((xd * xd).sum(-1, keepdim=True) + L2NORM_EPS)
    (ref * w.double()).sum().backward()
    assert torch.isfinite(xs.grad).all()
    assert (out.double() - ref).abs().max().item() < 1e-6
    assert (xs.grad.double() - xd.grad).abs().max().item() < 1e-5 * xd.grad.abs().max().item()
    low = run_l2norm(x, 0.25, torch.bfloat16)
    assert low.dtype is torch.bfloat16 and (low.double() - ref).abs().max().item() < 1e-2
