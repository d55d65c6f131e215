"""Cross-attention (memory inputs) in the generated noncausal form: the keys and values of a
second sequence of another length, summed into the state, read by every query; against the
float64 reference interpreter, with varlen on both sides, initial and final states and the
gradients of every input and the initial state."""

import pytest
import torch

import linforge
from linforge.library import path

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _spec(name):
    return linforge.compile(path("modular_linearized"), name=name)


def _problem(attn, B, T, S, dtype, seed=0, H=2, K=12, V=10):
    g = torch.Generator().manual_seed(seed)
    x = {"q": torch.randn(B, T, H, K, generator=g), "k": torch.randn(B, S, H, K, generator=g),
         "v": torch.randn(B, S, H, V, generator=g)}
    N = B
    init = {s: torch.randn(N, H, *(K if d == "K" else V for d in decl.dims), generator=g)
            .abs() * 0.3 + (0.5 if len(decl.dims) == 1 else 0.0)
            for s, decl in attn.program.states.items()}
    return {n: t.to(dtype) for n, t in x.items()}, init


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _run(attn, x, init, cu=None, cu_m=None, reference=False):
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    s0 = {s: t.clone().requires_grad_() for s, t in init.items()}
    call = attn.reference if reference else attn
    kw = {} if reference else {"form": "parallel"}
    if reference:
        leaves = {n: t.detach().double().requires_grad_() for n, t in x.items()}
        s0 = {s: t.detach().double().requires_grad_() for s, t in init.items()}
    o, final = call(**leaves, initial_state=s0, output_final_state=True, cu_seqlens=cu,
                    cu_seqlens_memory=cu_m, **kw)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(o.shape, generator=g).to(o.dtype)
    wf = {s: torch.randn(final[s].shape, generator=g).to(final[s].dtype) for s in sorted(final)}
    ((o * w).sum() + sum((final[s] * wf[s]).sum() for s in final)).backward()
    grads = {n: t.grad for n, t in leaves.items()} | {f"{s}0": t.grad for s, t in s0.items()}
    return o.detach(), {s: f.detach() for s, f in final.items()}, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["modular_linearized", "modular_linearized_relu"])
@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_cross_attention_matches_reference(name, dtype, varlen):
    """9 queries over 13 memory tokens (varlen: queries [0, 4), [4, 9) over memories [0, 6),
    [6, 13)); cosFormer's positions and lengths are the memory's in the updates and the
    queries' in the readout."""
    attn = _spec(name)
    if varlen:
        x, init = _problem(attn, 2, 9, 13, dtype)
        x = {n: t.reshape(1, -1, *t.shape[2:])[:, :(9 if n == "q" else 13)]
             for n, t in x.items()}
        cu, cu_m = torch.tensor([0, 4, 9]), torch.tensor([0, 6, 13])
    else:
        x, init = _problem(attn, 2, 9, 13, dtype)
        cu = cu_m = None
    o, final, grads = _run(attn, x, init, cu, cu_m)
    o_ref, f_ref, g_ref = _run(attn, x, init, cu, cu_m, reference=True)
    assert o.dtype == dtype and o.shape == x["q"].shape[:3] + (10,)
    errors = {"o": _rel(o, o_ref)} | {f"final {s}": _rel(final[s], f_ref[s]) for s in f_ref}
    errors |= {f"d{n}": _rel(grads[n], g_ref[n]) for n in g_ref}
    bad = {k: f"{e:.1e}" for k, e in errors.items() if not e < TOL[dtype]}
    assert not bad, bad


def test_cross_attention_auto_runs_the_gemm_stages_and_names_its_forms():
    attn = linforge.library.get("modular_linearized")
    assert attn.info()["auto_form"].startswith("parallel")
    assert attn.analysis.forms == ("parallel",)
    x, _ = _problem(attn, 1, 5, 7, torch.float32)
    o, _ = attn(**x)
    ref, _ = attn.reference(**x)
    assert _rel(o, ref) < 1e-5
    with pytest.raises(ValueError, match="does not support form='chunk'.*supports: parallel"):
        attn(**x, form="chunk")


def test_cross_attention_errors_name_the_mismatch():
    attn = linforge.library.get("modular_linearized")
    x, _ = _problem(attn, 1, 9, 13, torch.float32)
    with pytest.raises(ValueError, match="needs both cu_seqlens .* and cu_seqlens_memory"):
        attn(**x, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="cu_seqlens has 2 sequences but cu_seqlens_memory "
                                         "has 3"):
        attn(**x, cu_seqlens=torch.tensor([0, 4, 9]),
             cu_seqlens_memory=torch.tensor([0, 3, 6, 13]))
    with pytest.raises(ValueError, match="cu_seqlens_memory ends at 12 but the memory holds "
                                         "13 tokens"):
        attn(**x, cu_seqlens=torch.tensor([0, 4, 9]), cu_seqlens_memory=torch.tensor([0, 6, 12]))
    short = dict(x, v=x["v"][:, :12])
    with pytest.raises(ValueError, match="size of memory length is 13"):
        attn(**short)
