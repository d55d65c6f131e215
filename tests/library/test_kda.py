"""kda vs the Kimi Delta Attention recurrence (Kimi Linear, 2025, eq. 1), a loop over time.

In the paper's layout S_t in R^{K x V}, o_t = S_t^T q_t:
    S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T,
alpha_t = exp(g_t) in (0, 1) per key channel, beta_t in (0, 1), q and k L2-normalized
(x / sqrt(||x||^2 + 1e-6), as fla's kernels) and q scaled by K^-1/2.
"""

import torch
from _util import assert_close, gradcheck_spec, log_decay, randn, run_spec


def l2norm(x, eps=1e-6):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


def reference(q, k, v, g, beta, S0):
    """q, k, g [B, T, H, K], v [B, T, H, V], beta [B, T, H], S0 [B, H, K, V]."""
    q, k = l2norm(q) * q.shape[-1] ** -0.5, l2norm(k)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    S, out = S0.clone(), []
    for t in range(q.shape[1]):
        kt, vt, bt = k[:, t], v[:, t], beta[:, t, :, None, None]
        householder = eye - bt * torch.einsum("bhi,bhj->bhij", kt, kt)          # [B, H, K, K]
        decay = torch.diag_embed(torch.exp(g[:, t]))                              # Diag(alpha_t)
        S = householder @ decay @ S + bt * torch.einsum("bhk,bhv->bhkv", kt, vt)
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))                    # S_t^T q_t
    return torch.stack(out, 1), S


def test_matches_paper():
    torch.manual_seed(0)
    B, T, H, K, V = 2, 13, 2, 6, 5
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    g, beta = log_decay(B, T, H, K), torch.rand(B, T, H, dtype=torch.float64)
    S0 = randn(B, H, K, V)
    o, final = run_spec("kda", dict(q=q, k=k, v=v, g=g, beta=beta), {"S": S0})
    o_ref, S_ref = reference(q, k, v, g, beta, S0)
    assert_close(o, o_ref, what="o")
    assert_close(final["S"], S_ref, what="S")


def test_gradcheck():
    torch.manual_seed(1)
    B, T, H, K, V = 1, 3, 1, 2, 3
    t = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V),
             g=log_decay(B, T, H, K), beta=torch.rand(B, T, H, dtype=torch.float64))
    assert gradcheck_spec("kda", t, {"S": randn(B, H, K, V)})
