"""slab vs Guo et al. (2024), simplified linear attention without the DWC branch, in the
pairwise (attention-matrix) form

    O_i = sum_j Sim(Q_i, K_j) V_j / (sum_j Sim(Q_i, K_j) + eps),
    Sim(Q_i, K_j) = ReLU(Q_i) ReLU(K_j)^T,
eps = 1e-6 as the official code. Noncausal: every token reads the whole sequence.
"""

import torch
from _util import check_global_state_spec


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


def test_matches_paper_and_gradcheck():
    check_global_state_spec("slab", reference)
