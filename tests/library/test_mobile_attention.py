"""mobile_attention vs Yao et al. (2024) as in the authors' reference code (Mobile_Attention),
in matrix form over a whole sequence: flows against sums over the heads at each token,
source competition by a softmax over the T tokens times T, sigmoid allocation, eps = 1e-6 and
the clamp of the conserved outgoing flow to [-1, 1]:

    I = 1 / sum_d (phi(Q) + eps) (sum_h phi(K) + eps),
    O = 1 / sum_d (phi(K) + eps) (sum_h phi(Q) + eps),
    I^ = sum_d (phi(Q) + eps) (sum_h phi(K) O + eps),
    O^ = clamp(sum_d (phi(K) + eps) (sum_h phi(Q) I + eps), -1, 1)
    out = sigmoid(I^) * (phi(Q) I) (phi(K)^T (softmax_T(O^) T V)),   phi = sigmoid.
"""

import torch
from _util import assert_close, gradcheck_spec, randn, run_spec

import linforge

EPS = 1e-6


def reference(q, k, v):
    """q, k [B, T, H, K], v [B, T, H, V] -> o [B, T, H, V] and the state phi(K)^T (c V)."""
    T = q.shape[1]
    fq, fk = torch.sigmoid(q), torch.sigmoid(k)
    heads_q = fq.sum(2, keepdim=True)                 # [B, T, 1, K]: all heads at a token
    heads_k = fk.sum(2, keepdim=True)
    incoming = 1 / ((fq + EPS) * (heads_k + EPS)).sum(-1)                 # [B, T, H]
    outgoing = 1 / ((fk + EPS) * (heads_q + EPS)).sum(-1)
    sink = ((fq + EPS) * ((fk * outgoing[..., None]).sum(2, keepdim=True) + EPS)).sum(-1)
    source = ((fk + EPS) * ((fq * incoming[..., None]).sum(2, keepdim=True) + EPS)).sum(-1)
    source = source.clamp(-1.0, 1.0)
    competition = torch.softmax(source, dim=1) * T                      # over the tokens
    kv = torch.einsum("bthk,bthv->bhkv", fk, v * competition[..., None])
    o = torch.einsum("bthk,bhkv->bthv", fq * incoming[..., None], kv)
    return o * torch.sigmoid(sink)[..., None], kv


def test_matches_paper():
    torch.manual_seed(0)
    B, T, H, K, V = 2, 13, 3, 6, 5
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    o, final = run_spec("mobile_attention", dict(q=q, k=k, v=v))
    o_ref, kv = reference(q, k, v)
    assert_close(o, o_ref, what="o")
    assert_close(final["S"], kv, what="S")


def test_clamp_is_active_with_large_flows():
    """Inputs where the conserved outgoing flow exceeds 1, so the clamp matters."""
    torch.manual_seed(1)
    B, T, H, K, V = 1, 9, 4, 8, 3
    q, k, v = randn(B, T, H, K, scale=3.0), randn(B, T, H, K, scale=3.0), randn(B, T, H, V)
    fq, fk = torch.sigmoid(q), torch.sigmoid(k)
    incoming = 1 / ((fq + EPS) * (fk.sum(2, keepdim=True) + EPS)).sum(-1)
    raw = ((fk + EPS) * ((fq * incoming[..., None]).sum(2, keepdim=True) + EPS)).sum(-1)
    assert (raw > 1).any()
    o, _ = run_spec("mobile_attention", dict(q=q, k=k, v=v))
    assert_close(o, reference(q, k, v)[0], what="o")


def test_varlen_softmax_and_length_per_sequence():
    """Packed sequences: each sequence's competition is its own softmax times its own T."""
    torch.manual_seed(2)
    lens, H, K, V = [4, 1, 7], 2, 3, 4
    parts = [dict(q=randn(1, n, H, K), k=randn(1, n, H, K), v=randn(1, n, H, V)) for n in lens]
    packed = {x: torch.cat([p[x] for p in parts], dim=1) for x in ("q", "k", "v")}
    cu = torch.tensor([0, 4, 5, 12])
    attn = linforge.library.get("mobile_attention")
    o, final = attn.reference(**packed, cu_seqlens=cu, output_final_state=True)
    for n, p in enumerate(parts):
        o_ref, kv = reference(p["q"], p["k"], p["v"])
        assert_close(o[:, int(cu[n]):int(cu[n + 1])], o_ref, what=f"o of sequence {n}")
        assert_close(final["S"][n:n + 1], kv, what=f"S of sequence {n}")


def test_gradcheck():
    torch.manual_seed(3)
    B, T, H, K, V = 1, 3, 2, 2, 2
    t = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V))
    assert gradcheck_spec("mobile_attention", t)


def test_no_kernel_form_yet():
    a = linforge.library.get("mobile_attention").analysis
    assert a.forms == ()
    assert any("sum(..., H)" in b for b in a.kernel_blockers)
    assert any("softmax(..., T)" in b for b in a.kernel_blockers)
