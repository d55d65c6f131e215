"""agent_attention vs Han et al. (2024) eq. 3 in the paper's global (matrix) form.

    O = softmax(Q A^T / sqrt(d)) (softmax(A K^T / sqrt(d)) V),
softmaxes over the last axis: agent aggregation over the tokens, agent broadcast over the
M agents; d = K the head dim. A [H, M, K] per head. Noncausal.
"""

import torch
from _util import assert_close, gradcheck_spec, randn, run_spec


def reference(q, k, v, A):
    """q, k [B, T, H, K], v [B, T, H, V], A [H, M, K]."""
    scale = q.shape[-1] ** -0.5
    Q, Kh, Vh = (x.transpose(1, 2) for x in (q, k, v))                    # [B, H, T, .]
    agent_attn = torch.softmax((A * scale) @ Kh.transpose(-1, -2), dim=-1)  # [B, H, M, T]
    agent_v = agent_attn @ Vh                                               # [B, H, M, V]
    q_attn = torch.softmax((Q * scale) @ A.transpose(-1, -2), dim=-1)      # [B, H, T, M]
    return (q_attn @ agent_v).transpose(1, 2)


def test_matches_paper():
    torch.manual_seed(0)
    B, T, H, K, V, M = 2, 13, 2, 6, 5, 4
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    A = randn(H, M, K)
    o, final = run_spec("agent_attention", dict(q=q, k=k, v=v, A=A))
    assert_close(o, reference(q, k, v, A), what="o")
    # the states are the unnormalized token softmax: z = sum_j exp(A k_j / sqrt(d))
    z = torch.exp(torch.einsum("hmk,bthk->bhmt", A, k) * K ** -0.5).sum(-1)
    assert_close(final["z"], z, what="z")


def test_gradcheck():
    torch.manual_seed(1)
    B, T, H, K, V, M = 1, 3, 1, 2, 3, 3
    t = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V), A=randn(H, M, K))
    assert gradcheck_spec("agent_attention", t)
