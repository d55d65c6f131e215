"""efficientvit vs Cai et al. (2023) eq. 2 in its global (matrix) form.

    O = ReLU(Q) (ReLU(K)^T V) / (ReLU(Q) (ReLU(K)^T 1) + eps),
eps = 1e-15 as the official code (it pads V with a column of ones and divides by it).
Noncausal: every token reads the sums over the whole sequence.
"""

import torch
from _util import global_normalized_attention, assert_close, gradcheck_spec, randn, run_spec


def reference(q, k, v, eps=1e-15):
    """q, k [B, T, H, K], v [B, T, H, V] -> o [B, T, H, V], K^T V [B, H, K, V], K^T 1 [B, H, K]."""
    return global_normalized_attention(torch.relu(q), torch.relu(k), v, eps)


def test_matches_paper():
    torch.manual_seed(0)
    B, T, H, K, V = 2, 13, 2, 6, 5
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    o, final = run_spec("efficientvit", dict(q=q, k=k, v=v))
    o_ref, kv, ksum = reference(q, k, v)
    assert_close(o, o_ref, what="o")
    assert_close(final["S"], kv, what="S")
    assert_close(final["z"], ksum, what="z")


def test_gradcheck():
    torch.manual_seed(1)
    B, T, H, K, V = 1, 3, 1, 2, 3
    # keys positive so that no query reads an all-zero normalizer
    t = dict(q=randn(B, T, H, K), k=randn(B, T, H, K).abs() + 0.1, v=randn(B, T, H, V))
    assert gradcheck_spec("efficientvit", t)
