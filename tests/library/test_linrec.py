"""linrec vs Liu et al. (2023) in the matrix form of the authors' code.

    O = rho_r(ELU(Q)) (rho_c(ELU(K)^T) V) / sqrt(d),
rho_r divides each row of ELU(Q) [N, d] by its L2 norm; rho_c divides each column of
ELU(K)^T [d, N] (each token) by its L2 norm. ELU before the normalization, no eps.
Noncausal: every token reads the sums over the whole sequence.
"""

import math

import torch
import torch.nn.functional as F
from _util import assert_close, gradcheck_spec, randn, run_spec


def reference(q, k, v):
    """q, k [B, T, H, K], v [B, T, H, V] -> o [B, T, H, V], rho_c(ELU(K)^T) V [B, H, K, V]."""
    d = q.shape[-1]
    Q = F.elu(q).transpose(1, 2)                       # [B, H, N, d]
    Kt = F.elu(k).permute(0, 2, 3, 1)                  # [B, H, d, N] = ELU(K)^T
    Vh = v.transpose(1, 2)                             # [B, H, N, V]
    Qn = Q / torch.linalg.norm(Q, dim=-1, keepdim=True)          # rows of ELU(Q)
    Ktn = Kt / torch.linalg.norm(Kt, dim=-2, keepdim=True)       # columns of ELU(K)^T
    kv = Ktn @ Vh                                      # [B, H, d, V]
    o = (Qn @ kv) / math.sqrt(d)
    return o.transpose(1, 2), kv


def test_matches_paper():
    torch.manual_seed(0)
    B, T, H, K, V = 2, 13, 2, 6, 5
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    o, final = run_spec("linrec", dict(q=q, k=k, v=v))
    o_ref, kv = reference(q, k, v)
    assert_close(o, o_ref, what="o")
    assert_close(final["S"], kv, what="S")


def test_gradcheck():
    torch.manual_seed(1)
    B, T, H, K, V = 1, 3, 1, 2, 3
    t = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V))
    assert gradcheck_spec("linrec", t)
