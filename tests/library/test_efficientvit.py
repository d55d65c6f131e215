"""efficientvit vs Cai et al. (2023) eq. 2 in its global (matrix) form.

    O = ReLU(Q) (ReLU(K)^T V) / (ReLU(Q) (ReLU(K)^T 1) + eps),
eps = 1e-15 as the official code (it pads V with a column of ones and divides by it).
Noncausal: every token reads the sums over the whole sequence.
"""

import torch
from _util import check_global_state_spec, global_normalized_attention


def reference(q, k, v, eps=1e-15):
    """q, k [B, T, H, K], v [B, T, H, V] -> o [B, T, H, V], K^T V [B, H, K, V], K^T 1 [B, H, K]."""
    return global_normalized_attention(torch.relu(q), torch.relu(k), v, eps)


def test_matches_paper_and_gradcheck():
    check_global_state_spec("efficientvit", reference)
