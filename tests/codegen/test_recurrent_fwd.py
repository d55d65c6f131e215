"""The generated recurrent forward kernel against the reference interpreter, for every
library spec: output and final state, fp32 and bf16, odd T, K != V, varlen, initial state;
decode steps chained T times equal the full sequence."""

import pytest
import torch
from spec_inputs import kernel_names, make_inputs, make_state, spec_sizes

import linforge

NAMES = kernel_names()   # library specs without kernel blockers
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def rel_err(actual, expected):
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-6)).item()


def sizes_for(attn):
    # Based's F = 1 + K + K*K grows fast: keep it small on the CPU interpreter
    return spec_sizes(attn, K=6 if attn.name == "based" else 12, V=10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_recurrent_fwd_matches_reference(name, dtype):
    attn = linforge.library.get(name)
    sizes = sizes_for(attn)
    B, T, H = 2, 13, 2
    x = make_inputs(attn, B=B, T=T, H=H, sizes=sizes, seed=3)
    init = None if attn.program.noncausal else make_state(attn, N=B, H=H, sizes=sizes)
    xk = {k: (v.to(dtype) if k in attn.program.inputs else v) for k, v in x.items()}
    # the reference sees the same (rounded) inputs the kernel sees
    o_ref, st_ref = attn.reference(**{k: v.double() for k, v in xk.items()},
                                   initial_state=init, output_final_state=True)
    o, st = attn(**xk, initial_state=init, output_final_state=True, form="recurrent")
    assert o.dtype == dtype and o.shape == o_ref.shape
    assert torch.isfinite(o.float()).all()
    assert rel_err(o, o_ref) < TOL[dtype], f"o: {rel_err(o, o_ref):.2e}"
    for s in st_ref:
        assert rel_err(st[s], st_ref[s]) < TOL[torch.float32], s


@pytest.mark.parametrize("name", ["gla", "linear_attention", "gated_deltanet", "rwkv6",
                                  "efficientvit", "mlstm"])
def test_recurrent_fwd_varlen(name):
    attn = linforge.library.get(name)
    sizes = sizes_for(attn)
    cu = torch.tensor([0, 5, 6, 17, 24])
    x = make_inputs(attn, B=1, T=24, H=2, sizes=sizes, seed=4)
    init = None if attn.program.noncausal else make_state(attn, N=4, H=2, sizes=sizes)
    o_ref, st_ref = attn.reference(**{k: v.double() for k, v in x.items()}, cu_seqlens=cu,
                                   initial_state=init, output_final_state=True)
    o, st = attn(**x, cu_seqlens=cu, initial_state=init, output_final_state=True,
                 form="recurrent")
    assert rel_err(o, o_ref) < 1e-4
    for s in st_ref:
        assert rel_err(st[s], st_ref[s]) < 1e-4


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("name", ["gla", "mlstm", "rwkv7", "mamba2", "rwkv6"])
def test_decode_steps_equal_full_sequence(name, inplace):
    attn = linforge.library.get(name)
    sizes = sizes_for(attn)
    B, T, H = 3, 7, 2
    x = make_inputs(attn, B=B, T=T, H=H, sizes=sizes, seed=5)
    init = make_state(attn, N=B, H=H, sizes=sizes)
    o_full, st_full = attn(**x, initial_state=init, output_final_state=True, form="recurrent")
    state = {s: v.clone() for s, v in init.items()}
    outs = []
    for t in range(T):
        tok = {k: (v[:, t] if k in attn.program.inputs else v) for k, v in x.items()}
        o_t, new = attn.step(state, inplace=inplace, **tok)
        if inplace:
            assert all(new[s] is state[s] for s in state)
        state = new
        outs.append(o_t)
    assert rel_err(torch.stack(outs, 1), o_full) < 1e-5
    for s in st_full:
        assert rel_err(state[s], st_full[s]) < 1e-5


def test_generated_source_is_readable():
    src = linforge.library.get("gated_deltanet").source("recurrent", "fwd")
    assert "def gated_deltanet_recurrent_fwd(" in src
    assert "# S = exp(g) * (S - beta * outer(k, k @ S)) + beta * outer(k, v)" in src
    compile(src, "<generated>", "exec")


def test_decode_with_noncontiguous_state_and_token_axis():
    attn = linforge.library.get("mlstm")  # S[K, V] and a vector state
    sizes = sizes_for(attn)
    x = make_inputs(attn, B=2, T=1, H=2, sizes=sizes, seed=6)
    init = make_state(attn, N=2, H=2, sizes=sizes)
    o_ref, st_ref = attn(**x, initial_state=init, output_final_state=True, form="recurrent")
    # the same state stored transposed in memory: [B, H, V, K] viewed as [B, H, K, V]
    state = {s: (v.transpose(-1, -2).contiguous().transpose(-1, -2) if v.dim() == 4 else
                 v.clone()) for s, v in init.items()}
    o, new = attn.step(state, inplace=True, **x)  # inputs keep their [B, 1, H, ...] shape
    assert o.shape == o_ref.shape and rel_err(o, o_ref) < 1e-6
    for s in st_ref:
        assert new[s] is state[s] and rel_err(state[s], st_ref[s]) < 1e-6


def test_decode_rejects_wrong_shapes_with_a_clear_error():
    attn = linforge.library.get("gla")
    sizes = sizes_for(attn)
    x = make_inputs(attn, B=2, T=2, H=2, sizes=sizes)
    state = make_state(attn, N=2, H=2, sizes=sizes)
    with pytest.raises(ValueError, match=r"must be \[B, H, K\] or \[B, 1, H"):
        attn.step(state, **x)
    bad = dict(state, S=state["S"][:, :, :5])
    with pytest.raises(ValueError, match=r"initial_state\['S'\] must have shape"):
        attn.step(bad, **{k: v[:, 0] for k, v in x.items()})
