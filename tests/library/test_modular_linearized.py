"""modular_linearized vs Agostinelli and Chen (2023) as in the authors' code, in the quadratic
form with the weights written out (no cos / sin decomposition):

    w_ij = cos(pi/2 (i / L_q - j / L_k)) relu(q_i) . relu(k_j)     (1-based i, j)
    o_i = sum_j w_ij v_j / max(sum_j w_ij, 0.1)
for the cross-attention module (queries of one sequence, keys and values of a memory sequence
of another length), the encoder module (L_q = L_k = T), the causal decoder module (j <= i,
lengths given as an input L), and the "simple" ReLU module (w_ij = relu(q_i) . relu(k_j)).
"""

import math

import torch
from _util import DTYPE, assert_close, randn, run_cross

import linforge

SPECS = linforge.load(linforge.library.path("modular_linearized"))
CLAMP = 0.1


def quadratic(q, k, v, a, b, causal=False, reweight=True):
    """q [B, Tq, H, K], k [B, S, H, K], v [B, S, H, V]; a [Tq] / b [S] the angles, or
    [B, Tq, H] / [B, S, H] per token. Returns o [B, Tq, H, V]."""
    a = a if a.dim() == 3 else a[None, :, None].expand(q.shape[:3])
    b = b if b.dim() == 3 else b[None, :, None].expand(k.shape[:3])
    w = torch.einsum("bihk,bjhk->bhij", torch.relu(q), torch.relu(k))
    if reweight:
        w = w * torch.cos(a.permute(0, 2, 1)[..., :, None] - b.permute(0, 2, 1)[..., None, :])
    if causal:
        w = w * torch.tril(torch.ones(w.shape[-2:], dtype=w.dtype))
    den = w.sum(-1).clamp_min(CLAMP)                                      # [B, H, Tq]
    return torch.einsum("bhij,bjhv->bihv", w, v) / den.transpose(1, 2)[..., None]


def angles(n, length=None):
    return math.pi / 2 * torch.arange(1, n + 1, dtype=DTYPE) / (length or n)


def test_cross_attention_matches_the_authors_code():
    torch.manual_seed(0)
    B, Tq, S, H, K, V = 2, 7, 11, 2, 5, 4
    q, k, v = randn(B, Tq, H, K), randn(B, S, H, K), randn(B, S, H, V)
    o, final = run_cross(SPECS["modular_linearized"], dict(q=q), dict(k=k, v=v))
    assert_close(o, quadratic(q, k, v, angles(Tq), angles(S)), what="o")
    c, s = torch.cos(angles(S))[None, :, None, None], torch.sin(angles(S))[None, :, None, None]
    assert_close(final["Sc"], torch.einsum("bshk,bshv->bhkv", c * torch.relu(k), v), what="Sc")
    assert_close(final["zs"], (s * torch.relu(k)).sum(1), what="zs")


def test_cross_attention_varlen_for_both_sequences():
    """Packed queries and packed memory, each sequence with its own lengths, no leaks."""
    torch.manual_seed(1)
    lq, lk, H, K, V = [3, 5, 1], [6, 1, 5], 2, 3, 4
    qs = [randn(1, n, H, K) for n in lq]
    ks, vs = [randn(1, n, H, K) for n in lk], [randn(1, n, H, V) for n in lk]
    cu, cu_m = torch.tensor([0, 3, 8, 9]), torch.tensor([0, 6, 7, 12])
    o, final = run_cross(SPECS["modular_linearized"], dict(q=torch.cat(qs, 1)),
                         dict(k=torch.cat(ks, 1), v=torch.cat(vs, 1)), cu_seqlens=cu,
                         cu_seqlens_memory=cu_m)
    for n in range(3):
        ref = quadratic(qs[n], ks[n], vs[n], angles(lq[n]), angles(lk[n]))
        assert_close(o[:, int(cu[n]):int(cu[n + 1])], ref, what=f"o of sequence {n}")
        c = torch.cos(angles(lk[n]))[None, :, None]
        assert_close(final["zc"][n:n + 1], (c[..., None] * torch.relu(ks[n])).sum(1),
                     what=f"zc of sequence {n}")


def test_encoder_self_attention():
    torch.manual_seed(2)
    B, T, H, K, V = 2, 9, 2, 4, 3
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    o, _ = SPECS["modular_linearized_encoder"].reference(q=q, k=k, v=v)
    assert_close(o, quadratic(q, k, v, angles(T), angles(T)), what="o")
    # the weight is cosFormer's cos(pi/2 (i - j) / T)
    i = torch.arange(T, dtype=DTYPE)
    assert torch.allclose(torch.cos(angles(T)[:, None] - angles(T)[None, :]),
                          torch.cos(math.pi / 2 * (i[:, None] - i[None, :]) / T))


def test_encoder_varlen_uses_each_sequence_length():
    torch.manual_seed(3)
    lens, H, K, V = [4, 7], 1, 3, 2
    parts = [dict(q=randn(1, n, H, K), k=randn(1, n, H, K), v=randn(1, n, H, V)) for n in lens]
    packed = {x: torch.cat([p[x] for p in parts], dim=1) for x in ("q", "k", "v")}
    o, _ = SPECS["modular_linearized_encoder"].reference(**packed,
                                                         cu_seqlens=torch.tensor([0, 4, 11]))
    assert_close(o[:, :4], quadratic(**parts[0], a=angles(4), b=angles(4)), what="o 0")
    assert_close(o[:, 4:], quadratic(**parts[1], a=angles(7), b=angles(7)), what="o 1")


def test_causal_decoder_self_attention_with_a_given_length():
    torch.manual_seed(4)
    B, T, H, K, V = 2, 8, 2, 4, 3
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    L = torch.full((B, T, H), 10.0, dtype=DTYPE)        # e.g. a predicted target length
    o, _ = SPECS["modular_linearized_decoder"].reference(q=q, k=k, v=v, L=L)
    ref = quadratic(q, k, v, angles(T, 10), angles(T, 10), causal=True)
    assert_close(o, ref, what="o")


def test_simple_relu_cross_attention():
    torch.manual_seed(5)
    B, Tq, S, H, K, V = 2, 5, 8, 3, 4, 4
    q, k, v = randn(B, Tq, H, K), randn(B, S, H, K), randn(B, S, H, V)
    o, _ = run_cross(SPECS["modular_linearized_relu"], dict(q=q), dict(k=k, v=v))
    assert_close(o, quadratic(q, k, v, angles(Tq), angles(S), reweight=False), what="o")


def test_gradcheck_cross_attention():
    torch.manual_seed(6)
    B, Tq, S, H, K, V = 1, 2, 3, 1, 2, 2
    leaves = [randn(B, Tq, H, K).abs() + 0.5, randn(B, S, H, K).abs() + 0.5, randn(B, S, H, V),
              randn(B, H, K, V)]
    leaves = [x.requires_grad_() for x in leaves]
    attn = SPECS["modular_linearized"]

    def fn(q, k, v, S0):
        init = {"Sc": S0, "Ss": S0 * 0.5, "zc": torch.ones(B, H, K, dtype=DTYPE),
                "zs": torch.ones(B, H, K, dtype=DTYPE)}
        o, final = run_cross(attn, dict(q=q), dict(k=k, v=v), initial_state=init)
        return (o, *final.values())

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_the_library_spec_is_the_cross_attention_module():
    attn = linforge.library.get("modular_linearized")
    assert set(attn.program.memory) == {"k", "v"} and set(attn.program.inputs) == {"q"}
    assert attn.analysis.forms == ("parallel",)   # cross-attention: the noncausal GEMM form
