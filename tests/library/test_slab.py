"""slab vs Guo et al. (2024), simplified linear attention without the DWC branch, in the
pairwise (attention-matrix) form

    O_i = sum_j Sim(Q_i, K_j) V_j / (sum_j Sim(Q_i, K_j) + eps),
    Sim(Q_i, K_j) = ReLU(Q_i) ReLU(K_j)^T,
eps = 1e-6 as the official code. Noncausal: every token reads the whole sequence.
"""

import torch
from _util import assert_close, gradcheck_spec, randn, run_spec


def reference(q, k, v, eps=1e-6):
    """q, k [B, T, H, K], v [B, T, H, V] -> o [B, T, H, V], K^T V [B, H, K, V], K^T 1 [B, H, K]."""
    fq, fk = torch.relu(q), torch.relu(k)
    sim = torch.einsum("bihk,bjhk->bhij", fq, fk)                   # [B, H, T, T]
    o = torch.einsum("bhij,bjhv->bihv", sim, v) / (sim.sum(-1).transpose(1, 2)[..., None] + eps)
    B, T, H, K = k.shape
    kv = torch.zeros(B, H, K, v.shape[-1], dtype=v.dtype)
    ksum = torch.zeros(B, H, K, dtype=v.dtype)
    for j in range(T):
        kv = kv + torch.einsum("bhk,bhv->bhkv", fk[:, j], v[:, j])
        ksum = ksum + fk[:, j]
    return o, kv, ksum


def test_matches_paper():
    torch.manual_seed(0)
    B, T, H, K, V = 2, 13, 2, 6, 5
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    o, final = run_spec("slab", dict(q=q, k=k, v=v))
    o_ref, kv, ksum = reference(q, k, v)
    assert_close(o, o_ref, what="o")
    assert_close(final["S"], kv, what="S")
    assert_close(final["z"], ksum, what="z")


def test_gradcheck():
    torch.manual_seed(1)
    B, T, H, K, V = 1, 3, 1, 2, 3
    # keys positive so that no query reads an all-zero normalizer
    t = dict(q=randn(B, T, H, K), k=randn(B, T, H, K).abs() + 0.1, v=randn(B, T, H, V))
    assert gradcheck_spec("slab", t)
