"""The constructs the rest of the survey needs: reductions over the heads at one token
(``sum(x, H)``), reductions over the tokens of a noncausal sequence (``softmax(x, T)``) and its
length ``T``, memory inputs from a second sequence (cross-attention), params indexed by the
token's position (``E[t < N, P]``). Parser, errors with line and column, reference-interpreter
semantics against plain torch, and the analysis that keeps kernels off them."""

import pytest
import torch

import linforge
from linforge import SpecError
from linforge.dsl import parse
from linforge.ir.interpret import run_reference
from linforge.ir.show import show_ast, show_canonical, show_ir

F64 = torch.float64


def rnd(*shape):
    return torch.randn(*shape, dtype=F64)


def compile_one(body: str, header: str = "attention a noncausal", decls: str = ""):
    return linforge.compile(f"{header}\n{decls}{body}")


# ---------------------------------------------------------------- parser
def test_parser_reads_memory_and_position_indexed_params():
    (spec,) = parse("""attention x noncausal
    dim N, P
    inputs q[K]
    memory k[K], v[V]
    params E[t < N, P], w
    state S[K, V]
    S = S + outer(k, v)
    o = q @ S
""")
    assert [m.name for m in spec.memory] == ["k", "v"]
    assert [i.name for i in spec.inputs] == ["q"]
    E, w = spec.params
    assert E.dims == ("N", "P") and E.index == ("t", None)
    assert E.index_spans[0].line == 5 and E.index_spans[0].column == 14
    assert w.dims == () and w.index == ()
    assert "memory" in show_ast(spec)


def test_ir_prints_the_new_leaves_and_reductions():
    attn = linforge.compile("""attention x noncausal
    dim N, P
    inputs q[K]
    memory k[K], v[V]
    params E[t < N, K]
    state S[K, V]
    S = S + outer(k * E * softmax(sum(k, H), T) / T, v)
    o = q @ S
""")
    text = show_ir(attn.program)
    assert "memory  k[K], v[V]" in text and "params  E[t < N, K]" in text
    assert "softmax(sum(k, H), T)" in text and "E[t]" in text and "/ T" in text
    canonical = show_canonical(attn.analysis)
    assert "forms: none yet" in canonical and "no kernel yet for position-indexed" in canonical


# ---------------------------------------------------------------- errors
CAUSAL = "attention a"
BAD = [
    # (header, declarations, body, message fragment, line, column)
    (CAUSAL, "", "S = S + outer(softmax(k, T), v)\n    o = q @ S",
     "softmax over T (the tokens of the sequence) needs a noncausal spec", 4, 30),
    (CAUSAL, "", "S = S + outer(k / T, v)\n    o = q @ S", "undefined name 'T'", 4, 23),
    (CAUSAL, "    dim P\n    params E[t, P]\n", "S = S + outer(k, v)\n    o = q @ S",
     "needs a maximum length", 3, 14),
    (CAUSAL, "    dim N\n    params E[T, N]\n", "S = S + outer(k, v)\n    o = q @ S",
     "needs a maximum length", 3, 14),
    (CAUSAL, "    dim N\n    params E[s < N]\n", "S = S + outer(k, v)\n    o = q @ S",
     "a position index must be 't'", 3, 14),
    (CAUSAL, "    params E[t < K]\n", "S = S + outer(k, v)\n    o = q @ S",
     "must be a declared dim, not the head dim K", 2, 14),
    (CAUSAL, "    params E[t < M]\n", "S = S + outer(k, v)\n    o = q @ S",
     "unknown dim 'M'", 2, 18),
    (CAUSAL, "    dim N, P\n    params E[t < N, t < P]\n", "S = S + outer(k, v)\n    o = q @ S",
     "indexed by position twice", 3, 21),
    (CAUSAL, "    dim N\n    inputs g[t < N]\n", "S = S + outer(k, v)\n    o = q @ S",
     "only params can be indexed by position, but input 'g' is", 3, 14),
    (CAUSAL, "    dim T\n", "S = S + outer(k, v)\n    o = q @ S", "'T' is a builtin index", 2, 9),
    (CAUSAL, "    memory m[K]\n", "S = S + outer(k, v)\n    o = q @ S",
     "memory inputs need a noncausal spec", 2, 12),
    (CAUSAL, "", "S = S + outer(k, v * sum(k @ S, H))\n    o = q @ S",
     "sum(..., H) mixes the states of other heads into 'S'", 4, 26),
    (CAUSAL, "", "S = S + outer(k, v)\n    o = q @ S + sum(k, h)",
     "the second argument of sum must be a dim", 5, 24),
    ("attention a noncausal", "", "S = S + outer(k, v)\n    o = softmax(q @ S, T)",
     "a reduction over the tokens cannot read a state ('S')", 5, 21),
]


@pytest.mark.parametrize("header,decls,body,fragment,line,column", BAD)
def test_errors_point_at_the_token(header, decls, body, fragment, line, column):
    text = f"{header}\n{decls}    inputs q[K], k[K], v[V]\n    state S[K, V]\n    {body}\n"
    with pytest.raises(SpecError) as info:
        linforge.compile(text)
    err = info.value
    assert fragment in str(err), str(err)
    assert (err.line, err.column) == (line, column), str(err)
    assert "^" in str(err)


MEMORY_BAD = [
    ("S = S + outer(q, v)\n    o = q @ S",
     "the update of 'S' reads input 'q' of the query sequence", 5, 19),
    ("S = S + outer(k, v)\n    o = k @ S", "the output reads memory input 'k'", 6, 9),
]


@pytest.mark.parametrize("body,fragment,line,column", MEMORY_BAD)
def test_memory_errors_point_at_the_read(body, fragment, line, column):
    text = f"""attention a noncausal
    inputs q[K]
    memory k[K], v[V]
    state S[K, V]
    {body}
"""
    with pytest.raises(SpecError) as info:
        linforge.compile(text)
    assert fragment in str(info.value), str(info.value)
    assert (info.value.line, info.value.column) == (line, column), str(info.value)


def test_memory_without_inputs_is_an_error():
    with pytest.raises(SpecError, match="has memory inputs but no inputs"):
        linforge.compile("attention a noncausal\n    memory k[K], v[V]\n    state S[K, V]\n"
                         "    S = S + outer(k, v)\n    o = sum(S, V) @ S")


# ---------------------------------------------------------------- interpreter
def test_reductions_over_heads_at_one_token():
    attn = linforge.compile("""attention a
    inputs q[K], k[K], v[V]
    state S[K, V]
    S = S + outer(k / sum(norm(k), H), softmax(v, H) + l2norm(v, H) * sum(h + 1, H))
    o = q @ S
""")
    B, T, H, K, V = 2, 4, 3, 3, 2
    q, k, v = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, H, V)
    _, final = attn.reference(q=q, k=k, v=v, output_final_state=True)
    kk = k / k.norm(dim=-1, keepdim=True).sum(2, keepdim=True)
    l2 = v / torch.sqrt((v * v).sum(2, keepdim=True) + 1e-6)
    vv = torch.softmax(v, dim=2) + l2 * (H * (H + 1) / 2)
    torch.testing.assert_close(final["S"], torch.einsum("bthk,bthv->bhkv", kk, vv))
    assert "sum(..., H)" in attn.analysis.kernel_blockers[0]


def test_reductions_over_tokens_nested_and_the_length():
    attn = linforge.compile("""attention a noncausal
    inputs q[K], k[K], v[V]
    state S[K, V]
    c = sum(k, T) / T
    w = softmax(sum((k - c) * (k - c)), T)
    S = S + outer(l2norm(k, T), w * T * v)
    o = (q @ S) * norm(sum(q, T)) + sum(norm(q, T))
""")
    B, T, H, K, V = 2, 5, 2, 3, 4
    q, k, v = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, H, V)
    o, final = attn.reference(q=q, k=k, v=v, output_final_state=True)
    c = k.mean(1, keepdim=True)
    w = torch.softmax(((k - c) ** 2).sum(-1), dim=1)
    kn = k / torch.sqrt((k * k).sum(1, keepdim=True) + 1e-6)
    S = torch.einsum("bthk,bthv->bhkv", kn, w[..., None] * T * v)
    torch.testing.assert_close(final["S"], S)
    scale = q.sum(1, keepdim=True).norm(dim=-1, keepdim=True)           # [B, 1, H, 1]
    shift = q.norm(dim=1, keepdim=True).sum(-1, keepdim=True)
    torch.testing.assert_close(o, torch.einsum("bthk,bhkv->bthv", q, S) * scale + shift)


def test_token_reductions_and_length_are_per_sequence_with_varlen():
    attn = linforge.compile("""attention a noncausal
    inputs k[K], v[V]
    state S[K, V]
    S = S + outer(softmax(k, T), v / T)
    o = sum(k, T) @ S
""")
    lens, H, K, V = [3, 1, 4], 2, 2, 3
    parts = [dict(k=rnd(1, n, H, K), v=rnd(1, n, H, V)) for n in lens]
    packed = {x: torch.cat([p[x] for p in parts], dim=1) for x in ("k", "v")}
    cu = torch.tensor([0, 3, 4, 8])
    o, final = attn.reference(**packed, cu_seqlens=cu, output_final_state=True)
    for n, p in enumerate(parts):
        S = torch.einsum("bthk,bthv->bhkv", torch.softmax(p["k"], dim=1), p["v"] / lens[n])
        torch.testing.assert_close(final["S"][n:n + 1], S)
        ref = torch.einsum("bhk,bhkv->bhv", p["k"].sum(1), S)[:, None].expand(1, lens[n], H, V)
        torch.testing.assert_close(o[:, int(cu[n]):int(cu[n + 1])], ref)


CROSS = """attention cross noncausal
    inputs q[K]
    memory k[K], v[V]
    state S[K, V]
    S = S + outer(k * (t + 1) / T, v)
    o = (q @ S) * (t + 1) / T
"""


def cross_reference(q, k, v):
    Tq, S = q.shape[1], k.shape[1]
    wk = (torch.arange(S, dtype=F64) + 1) / S
    wq = (torch.arange(Tq, dtype=F64) + 1) / Tq
    st = torch.einsum("bshk,bshv->bhkv", k * wk[None, :, None, None], v)
    return torch.einsum("bthk,bhkv->bthv", q, st) * wq[None, :, None, None], st


def test_memory_updates_run_over_the_memory_and_the_readout_over_the_queries():
    attn = linforge.compile(CROSS)
    B, Tq, S, H, K, V = 2, 4, 6, 2, 3, 2
    q, k, v = rnd(B, Tq, H, K), rnd(B, S, H, K), rnd(B, S, H, V)
    o, final = run_reference(attn.program, dict(q=q), {}, {"K": K, "V": V, "H": H},
                             memory=dict(k=k, v=v))
    o_ref, st = cross_reference(q, k, v)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(final["S"], st)
    init = {"S": rnd(B, H, K, V)}
    o2, final2 = run_reference(attn.program, dict(q=q), {}, {"K": K, "V": V, "H": H},
                               memory=dict(k=k, v=v), initial_state=init)
    torch.testing.assert_close(final2["S"], st + init["S"])


def test_memory_varlen_pairs_sequence_n_with_memory_n():
    attn = linforge.compile(CROSS)
    lq, lk, H, K, V = [2, 4], [5, 1], 2, 3, 2
    qs = [rnd(1, n, H, K) for n in lq]
    ks, vs = [rnd(1, n, H, K) for n in lk], [rnd(1, n, H, V) for n in lk]
    o, final = run_reference(attn.program, dict(q=torch.cat(qs, 1)), {},
                             {"K": K, "V": V, "H": H},
                             memory=dict(k=torch.cat(ks, 1), v=torch.cat(vs, 1)),
                             cu_seqlens=torch.tensor([0, 2, 6]),
                             cu_seqlens_memory=torch.tensor([0, 5, 6]))
    for n, lo in enumerate([0, 2]):
        o_ref, st = cross_reference(qs[n], ks[n], vs[n])
        torch.testing.assert_close(o[:, lo:lo + lq[n]], o_ref)
        torch.testing.assert_close(final["S"][n:n + 1], st)


def test_memory_call_errors():
    p = linforge.compile(CROSS).program
    q, k, v = rnd(1, 3, 1, 2), rnd(1, 4, 1, 2), rnd(1, 4, 1, 2)
    sizes = {"K": 2, "V": 2, "H": 1}
    with pytest.raises(ValueError, match="memory must map exactly the memory inputs k, v"):
        run_reference(p, dict(q=q), {}, sizes, memory=dict(k=k))
    with pytest.raises(ValueError, match="one length S"):
        run_reference(p, dict(q=q), {}, sizes, memory=dict(k=k, v=v[:, :3]))
    with pytest.raises(ValueError, match="needs both cu_seqlens"):
        run_reference(p, dict(q=q), {}, sizes, memory=dict(k=k, v=v),
                      cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="cu_seqlens has 1 sequences but cu_seqlens_memory has 2"):
        run_reference(p, dict(q=q), {}, sizes, memory=dict(k=k, v=v),
                      cu_seqlens=torch.tensor([0, 3]), cu_seqlens_memory=torch.tensor([0, 1, 4]))
    plain = linforge.library.get("slab").program
    with pytest.raises(ValueError, match="declares none"):
        run_reference(plain, dict(q=q, k=q, v=q), {}, sizes, memory=dict(k=k))


POSITIONAL = """attention pos
    dim N
    inputs k[K], v[V]
    params E[t < N, K], b
    state S[K, V]
    S = S + outer(k * E + b, v)
    o = k @ S
"""


def test_position_indexed_param_reads_row_t_and_restarts_with_varlen():
    attn = linforge.compile(POSITIONAL)
    assert attn.program.params["E"].position == "N"
    assert attn.program.params["E"].value_dims == ("K",)
    H, K, V, N = 2, 3, 2, 5
    E, b = rnd(H, N, K), rnd(H)
    lens = [4, 2]
    parts = [dict(k=rnd(1, n, H, K), v=rnd(1, n, H, V)) for n in lens]
    packed = {x: torch.cat([p[x] for p in parts], dim=1) for x in ("k", "v")}
    _, final = attn.reference(**packed, E=E, b=b, cu_seqlens=torch.tensor([0, 4, 6]),
                              output_final_state=True)
    for n, p in enumerate(parts):
        rows = E[:, :lens[n]].transpose(0, 1)[None]                  # [1, T, H, K]
        kk = p["k"] * rows + b[None, None, :, None]
        torch.testing.assert_close(final["S"][n:n + 1],
                                   torch.einsum("bthk,bthv->bhkv", kk, p["v"]))
    with pytest.raises(ValueError, match="the sequence has 6 tokens, more than N = 5"):
        attn.reference(**packed, E=E, b=b)


def test_declared_maximum_length_is_checked_against_the_tensor():
    attn = linforge.compile(POSITIONAL.replace("dim N", "dim N = 5"))
    x = dict(k=rnd(1, 3, 1, 2), v=rnd(1, 3, 1, 2), b=rnd(1))
    attn.reference(**x, E=rnd(1, 5, 2))
    with pytest.raises(ValueError, match="dim N = 5 = 5, but a tensor has N = 4"):
        attn.reference(**x, E=rnd(1, 4, 2))


def test_gradients_flow_through_every_new_construct():
    attn = linforge.compile("""attention g noncausal
    dim N
    inputs q[K], k[K], v[V]
    params E[t < N, K]
    state S[K, V]
    k = k * E / sum(norm(k), H)
    S = S + outer(softmax(k, T), l2norm(v, T) + sum(v, T) / T)
    o = q @ S
""")
    B, T, H, K, V, N = 1, 3, 2, 2, 2, 4
    leaves = [rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, H, V), rnd(H, N, K)]
    leaves = [x.requires_grad_() for x in leaves]

    def fn(q, k, v, E):
        o, final = attn.reference(q=q, k=k, v=v, E=E, output_final_state=True)
        return o, final["S"]

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- analysis
def test_kernel_blockers_name_each_construct_and_leave_no_form():
    attn = linforge.compile("""attention all noncausal
    dim N
    inputs q[K]
    memory k[K], v[V]
    params E[t < N, K]
    state S[K, V]
    S = S + outer(softmax(k * E, T) / T, v)
    o = q @ S / sum(norm(q), H)
""")
    blockers = attn.analysis.kernel_blockers
    # (memory inputs and T run in the noncausal GEMM form: not blockers by themselves)
    assert blockers == [
        "position-indexed params E[t < N]",
        "a reduction over the heads at one token: sum(..., H) (line 8)",
        "a reduction over the tokens of the sequence: softmax(..., T) (line 7)",
    ]
    assert attn.analysis.forms == () and attn.info()["forms"] == []
    assert attn.analysis.transition_class.value == "identity"


def test_only_the_specs_using_the_constructs_lose_their_kernel_forms():
    for name in linforge.library.names():
        a = linforge.library.get(name).analysis
        if name in ("mobile_attention", "linformer"):
            assert a.kernel_blockers and a.forms == (), name
        elif name == "modular_linearized":  # cross-attention: the noncausal GEMM form only
            assert a.kernel_blockers == [] and a.forms == ("parallel",), name
        else:
            assert a.kernel_blockers == [] and a.forms == a.transition_class.forms or \
                a.forms == ("recurrent",), name


def test_kernel_forms_refuse_a_blocked_spec():
    attn = linforge.library.get("modular_linearized")   # memory inputs: the GEMM form only
    x = dict(q=rnd(1, 3, 2, 2), k=rnd(1, 3, 2, 2), v=rnd(1, 3, 2, 2))
    with pytest.raises(ValueError, match="supports: parallel"):
        attn(**x, form="recurrent")


def test_cli_shows_prepass_and_reference_only_specs_and_their_blockers(capsys):
    from linforge.cli import main

    assert main(["list", "--markdown"]) == 0
    rows = {r.split(" | ")[0].lstrip("| "): r for r in capsys.readouterr().out.splitlines()}
    for name, lines, forms in (
            ("mobile_attention", 11, "recurrent, chunk, parallel (pre-pass)"),
            ("linformer", 8, "recurrent (pre-pass)"),
            ("modular_linearized", 12, "parallel")):
        assert rows[name].endswith(f"| {lines} | identity | {forms} |"), rows[name]
    assert main(["check", str(linforge.library.path("linformer"))]) == 0
    out = capsys.readouterr().out
    assert "forms: recurrent (pre-pass)" in out
    assert "position-indexed params E[t < N], F[t < N]" in out
