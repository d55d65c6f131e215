"""The generated recurrent backward kernel against autograd through the float64 reference
interpreter: gradients of every input, param and initial state, for every library and
DESIGN.md spec, fp32 and bf16, odd T, K != V, V split over programs, varlen; and the
memory bound (checkpoints per chunk, never a state per token)."""

import math

import pytest
import torch
from spec_inputs import kernel_sizes, kernel_specs, make_inputs, make_state

import linforge
import linforge.codegen.ops as ops

SPECS = kernel_specs()   # library and DESIGN.md specs without kernel blockers
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def rel_err(actual, expected):
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-6)).item()


def run_with_grads(attn, x, init, *, dtype, form, cu_seqlens=None, seed=0, states=True):
    """Forward, then backward of a random linear loss on o and the final states (none with
    ``states=False``)."""
    xs = {k: v.detach().to(dtype).requires_grad_() for k, v in x.items()}
    st = {k: v.detach().clone().requires_grad_() for k, v in init.items()} if init else None
    if form == "reference":
        o, final = attn.reference(**{k: v.double() for k, v in xs.items()},
                                  initial_state=({k: v.double() for k, v in st.items()}
                                                 if st else None),
                                  output_final_state=states, cu_seqlens=cu_seqlens)
    else:
        o, final = attn(**xs, initial_state=st, output_final_state=states, form=form,
                        cu_seqlens=cu_seqlens)
    final = final or {}
    g = torch.Generator().manual_seed(seed)

    def weights(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device)

    loss = (o.double() * weights(o)).sum()
    for s in sorted(final):
        loss = loss + (final[s].double() * weights(final[s])).sum()
    loss.backward()
    grads = {n: v.grad for n, v in xs.items()}
    grads.update({f"{s}0": v.grad for s, v in (st or {}).items()})
    return o, final, grads


def check_against_reference(attn, x, init, dtype, cu_seqlens=None, form="recurrent",
                            states=True):
    # the reference sees the same rounded inputs the kernel sees
    xr = {k: v.to(dtype) for k, v in x.items()}
    o_ref, f_ref, g_ref = run_with_grads(attn, xr, init, dtype=torch.float64, form="reference",
                                         cu_seqlens=cu_seqlens, states=states)
    o, f, g = run_with_grads(attn, xr, init, dtype=dtype, form=form, cu_seqlens=cu_seqlens,
                             states=states)
    errors = {"o": rel_err(o, o_ref)}
    errors.update({f"final {s}": rel_err(f[s], f_ref[s]) for s in f_ref})
    for n, ref in g_ref.items():
        assert g[n] is not None and g[n].shape == ref.shape, n
        assert torch.isfinite(g[n].float()).all(), n
        errors[f"d{n}"] = rel_err(g[n], ref)
    bad = {k: f"{e:.1e}" for k, e in errors.items() if e > TOL[dtype]}
    assert not bad, f"{attn.name}: errors above {TOL[dtype]:.0e}: {bad}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("key", list(SPECS))
def test_recurrent_grads_match_reference(key, dtype):
    attn = SPECS[key]
    sizes = kernel_sizes(attn)
    B, T, H = 2, 13, 2
    x = make_inputs(attn, B=B, T=T, H=H, sizes=sizes, seed=3)
    init = None if attn.program.noncausal else make_state(attn, N=B, H=H, sizes=sizes)
    check_against_reference(attn, x, init, dtype)


SPLIT = ["gla", "rwkv6", "gated_deltanet", "kda", "rwkv7", "linear_attention", "mlstm",
         "efficientvit", "hgrn2", "based"]


@pytest.mark.parametrize("initial", [True, False], ids=["init", "zero-init"])
@pytest.mark.parametrize("name", SPLIT)
def test_recurrent_grads_with_v_split(name, initial, monkeypatch):
    """V = 10 in blocks of 4: three programs per head, partial gradients summed."""
    monkeypatch.setattr(ops, "FORCE_BLOCK_V", 4)
    attn = linforge.library.get(name)
    sizes = kernel_sizes(attn)
    x = make_inputs(attn, B=2, T=11, H=2, sizes=sizes, seed=7)
    init = make_state(attn, N=2, H=2, sizes=sizes) if initial and not \
        attn.program.noncausal else None
    check_against_reference(attn, x, init, torch.float32)


@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "rwkv6", "mamba2", "efficientvit",
                                  "mlstm", "linear_attention"])
def test_recurrent_grads_varlen(name):
    attn = linforge.library.get(name)
    sizes = kernel_sizes(attn)
    cu = torch.tensor([0, 5, 6, 23, 30])
    x = make_inputs(attn, B=1, T=30, H=2, sizes=sizes, seed=4)
    init = None if attn.program.noncausal else make_state(attn, N=4, H=2, sizes=sizes)
    check_against_reference(attn, x, init, torch.float32, cu_seqlens=cu)


def test_backward_memory_is_checkpoints_not_states_per_token():
    """Saved for backward: inputs, params and one state per chunk of ~sqrt(T) steps."""
    attn = linforge.library.get("gla")
    sizes = {"K": 16, "V": 16}
    B, T, H = 1, 100, 1
    x = make_inputs(attn, B=B, T=T, H=H, sizes=sizes)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    xs = {k: v.requires_grad_() for k, v in x.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o, _ = attn(**xs, form="recurrent")
    inputs = sum(v.numel() for v in x.values())
    state = sizes["K"] * sizes["V"]
    chunk = 16  # the power of two >= sqrt(100)
    assert sum(saved) <= inputs + math.ceil(T / chunk) * state
    assert sum(saved) < inputs + T * state / 4
    o.sum().backward()
    assert all(torch.isfinite(v.grad).all() for v in xs.values())


def test_params_gradient_reduced_over_batch_and_time():
    attn = linforge.library.get("mamba2")
    sizes = kernel_sizes(attn)
    x = make_inputs(attn, B=3, T=9, H=2, sizes=sizes, seed=2)
    _, _, g = run_with_grads(attn, x, None, dtype=torch.float32, form="recurrent")
    _, _, g_ref = run_with_grads(attn, x, None, dtype=torch.float64, form="reference")
    for n in attn.program.params:
        assert g[n].shape == x[n].shape
        assert rel_err(g[n], g_ref[n]) < 1e-4


def test_backward_source_is_readable():
    src = linforge.library.get("gla").source("recurrent", "bwd")
    assert "def gla_recurrent_bwd(" in src
    assert "# S = exp(g) * S + outer(k, v)" in src
    assert "d/d g" in src
    compile(src, "<generated>", "exec")
