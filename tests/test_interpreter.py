"""Reference interpreter semantics (varlen, initial state, noncausal, statement order), the
canonical form's equivalence with the updates as written, and call validation."""

import pytest
import torch

import linforge
from linforge.ir.interpret import StepEvaluator, align
from linforge.ir.nodes import Op

torch.manual_seed(0)
F64 = torch.float64


def gla_inputs(B=2, T=9, H=2, K=4, V=3):
    return dict(q=torch.randn(B, T, H, K, dtype=F64), k=torch.randn(B, T, H, K, dtype=F64),
                v=torch.randn(B, T, H, V, dtype=F64),
                g=torch.log(torch.empty(B, T, H, K, dtype=F64).uniform_(0.6, 0.99)))


def test_varlen_equals_separate_sequences_and_does_not_leak():
    gla = linforge.library.get("gla")
    lens = [3, 5, 1]
    parts = [gla_inputs(B=1, T=n) for n in lens]
    packed = {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}
    init = {"S": torch.randn(len(lens), 2, 4, 3, dtype=F64)}
    cu = torch.tensor([0, 3, 8, 9])
    o, final = gla.reference(**packed, cu_seqlens=cu, initial_state=init,
                             output_final_state=True)
    for n, p in enumerate(parts):
        o_n, f_n = gla.reference(**p, initial_state={"S": init["S"][n:n + 1]},
                                 output_final_state=True)
        lo, hi = int(cu[n]), int(cu[n + 1])
        torch.testing.assert_close(o[:, lo:hi], o_n, rtol=0, atol=1e-12)
        torch.testing.assert_close(final["S"][n:n + 1], f_n["S"], rtol=0, atol=1e-12)


def test_initial_state_continues_a_sequence():
    gla = linforge.library.get("gla")
    x = gla_inputs(T=10)
    o_all, f_all = gla.reference(**x, output_final_state=True)
    first = {k: v[:, :4] for k, v in x.items()}
    rest = {k: v[:, 4:] for k, v in x.items()}
    o1, f1 = gla.reference(**first, output_final_state=True)
    o2, f2 = gla.reference(**rest, initial_state=f1, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_all)
    torch.testing.assert_close(f2["S"], f_all["S"])


def test_readout_before_update_reads_previous_state():
    before = linforge.compile("""
attention a
    inputs q[K], k[K], v[V]
    state S[K, V]
    o = q @ S
    S = S + outer(k, v)
""")
    after = linforge.compile("""
attention b
    inputs q[K], k[K], v[V]
    state S[K, V]
    S = S + outer(k, v)
    o = q @ S
""")
    x = gla_inputs()
    del x["g"]
    o_b, _ = before.reference(**x)
    o_a, _ = after.reference(**x)
    # o_before[t] = o_after[t] - (q_t . k_t) v_t
    corr = torch.einsum("bthk,bthk->bth", x["q"], x["k"])[..., None] * x["v"]
    torch.testing.assert_close(o_b, o_a - corr)


def test_noncausal_reads_the_whole_sequence():
    vit = linforge.library.get("efficientvit")
    x = gla_inputs(T=7)
    del x["g"]
    o, _ = vit.reference(**x)
    q, k = torch.relu(x["q"]), torch.relu(x["k"])
    S = torch.einsum("bthk,bthv->bhkv", k, x["v"])
    z = k.sum(1)
    ref = torch.einsum("bthk,bhkv->bthv", q, S) / (
        torch.einsum("bthk,bhk->bth", q, z)[..., None] + 1e-15)
    torch.testing.assert_close(o, ref)


def test_position_and_head_indices():
    attn = linforge.compile("""
attention pos
    inputs k[K], v[V]
    state S[K, V]
    S = S + outer(k * (t + 1), v * (h + 1) / H)
    o = k @ S
""")
    x = gla_inputs(T=5, H=3)
    _, f = attn.reference(k=x["k"], v=x["v"], output_final_state=True)
    t = torch.arange(5, dtype=F64).reshape(1, 5, 1, 1) + 1
    h = (torch.arange(3, dtype=F64).reshape(1, 1, 3, 1) + 1) / 3
    ref = torch.einsum("bthk,bthv->bhkv", x["k"] * t, x["v"] * h)
    torch.testing.assert_close(f["S"], ref)


def _canonical_next(upd, ev, S):
    """S' from the canonical form: scale * S + sum outer(x, w @ S) + sum outer(x_i, y_i)."""
    dims = upd.dims
    out = align(ev(upd.scale), upd.scale.dims, dims) * S
    for r in upd.rank_one:
        x = align(ev(r.x), r.x.dims, dims[:1])
        w = align(ev(r.w), r.w.dims, dims[:1])
        read = torch.einsum("bhk,bhk...->bh...", w.expand_as(S[..., 0] if len(dims) == 2
                                                             else S), S)
        out = out + (x[..., None] * read[..., None, :] if len(dims) == 2 else x * read[..., None])
    if upd.inputs is None:   # not a sum of outer products (e.g. S4D's B * u): use as a whole
        return out + align(ev(upd.forcing), upd.forcing.dims, dims)
    for term in upd.inputs:
        x = align(ev(term.x), term.x.dims, dims[:1])
        out = out + (x if term.y is None else
                     x[..., None] * align(ev(term.y), term.y.dims, dims[1:])[..., None, :])
    return out


@pytest.mark.parametrize("name", linforge.library.names())
def test_canonical_form_equals_updates_as_written(name):
    """For every library spec, one step of the canonical form equals the written updates."""
    attn = linforge.library.get(name)
    p = attn.program
    sizes = {"K": 3, "V": 2, "H": 2, "M": 4}
    for d, expr in p.dims.items():
        if expr is None:
            sizes.setdefault(d, 4)   # sized by the tensors (M; Linformer's P and N)
        else:
            sizes[d] = int(expr.subs({s: sizes[str(s)] for s in expr.free_symbols}))
    B, H = 2, 2

    def rnd(dims, lead):
        return torch.rand(*lead, *(sizes[d] for d in dims), dtype=F64) * 0.8 + 0.1

    values = {("input", n): rnd(d.dims, (B, H)) for n, d in p.inputs.items()}
    values.update({("memory", n): rnd(d.dims, (B, H)) for n, d in p.memory.items()})
    # a position-indexed param: the row this token reads
    values.update({("param", n): rnd(d.value_dims, (1, H)) for n, d in p.params.items()})
    values.update({("state", s, 0): torch.randn(B, H, *(sizes[x] for x in d.dims), dtype=F64)
                   for s, d in p.states.items()})
    values["h"] = torch.arange(H, dtype=F64).reshape(1, H)
    values["t"] = torch.full((1, 1), 3.0, dtype=F64)
    values["T"] = torch.full((1, 1), 7.0, dtype=F64)
    ev = StepEvaluator(values, sizes, F64, torch.device("cpu"))
    for u in p.updates:  # a reduction over tokens is a given per-token value within one step
        ev.memo.update({n: rnd(n.dims, (B, H)) for n in u.value.walk() if n.op is Op.OVER_TOKENS})
    for u in p.updates:
        ev.values[("state", u.state, u.version)] = ev(u.value)
    for s, upd in attn.analysis.updates.items():
        written = ev.values[("state", s, p.final_version(s))]
        canonical = _canonical_next(upd, ev, values[("state", s, 0)])
        torch.testing.assert_close(canonical, written.expand_as(canonical))


def test_call_validation_names_the_argument():
    gla = linforge.library.get("gla")
    x = gla_inputs()
    with pytest.raises(ValueError, match="missing argument"):
        gla(q=x["q"], k=x["k"], v=x["v"])
    with pytest.raises(ValueError, match="unknown argument"):
        gla(**x, beta=x["g"])
    bad = dict(x, k=x["k"][..., :3])
    with pytest.raises(ValueError, match=r"size of K is 4 from 'q' \[B, T, H, K\] but 3 from 'k'"):
        gla(**bad)
    with pytest.raises(ValueError, match=r"input 'v' must have shape \[B, T, H, V\]"):
        gla(**dict(x, v=x["v"][0]))
    with pytest.raises(ValueError, match="floating-point"):
        gla(**dict(x, q=x["q"].long()))
    with pytest.raises(ValueError, match=r"initial_state\['S'\] must have shape"):
        gla(**x, initial_state={"S": torch.zeros(2, 2, 3, 4)})
    with pytest.raises(ValueError, match="cu_seqlens"):
        gla(**x, cu_seqlens=torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="does not support form='parallel'"):
        linforge.library.get("deltanet")(**dict(x, beta=x["g"][..., 0]), form="parallel")
    with pytest.raises(ValueError, match="form must be one of"):
        gla(**x, form="fast")


def test_call_returns_input_dtype_and_fp32_states():
    gla = linforge.library.get("gla")
    x = {k: v.float() for k, v in gla_inputs().items()}
    x["v"] = x["v"].to(torch.bfloat16)
    o, st = gla(**x, output_final_state=True)
    assert o.dtype == torch.bfloat16 and st["S"].dtype == torch.float32


def test_autograd_flows_through_reference():
    gla = linforge.library.get("gla")
    x = {k: v.requires_grad_() for k, v in gla_inputs(T=4).items()}
    o, _ = gla.reference(**x)
    o.sum().backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in x.values())
