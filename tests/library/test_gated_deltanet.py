"""gated_deltanet vs Yang, Kautz, Hatamizadeh (2024) eq. 10, written as a loop over time.

In the paper's layout S_t in R^{V x K}, o_t = S_t q_t:
    S_t = S_{t-1} (alpha_t (I - beta_t k_t k_t^T)) + beta_t v_t k_t^T,
alpha_t = exp(g_t) in (0, 1), beta_t in (0, 1), q and k L2-normalized
(x / sqrt(||x||^2 + 1e-6), as fla's kernels) and q scaled by K^-1/2.
"""

import torch
from _util import assert_close, gradcheck_spec, log_decay, randn, run_spec


def l2norm(x, eps=1e-6):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


def reference(q, k, v, g, beta, S0_vk):
    """q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H], S0_vk [B, H, V, K] (paper layout)."""
    q, k = l2norm(q) * q.shape[-1] ** -0.5, l2norm(k)
    K = q.shape[-1]
    eye = torch.eye(K, dtype=q.dtype)
    S, out = S0_vk.clone(), []
    for t in range(q.shape[1]):
        kt, vt = k[:, t], v[:, t]
        alpha, bt = torch.exp(g[:, t])[..., None, None], beta[:, t, :, None, None]
        transition = alpha * (eye - bt * torch.einsum("bhi,bhj->bhij", kt, kt))   # [B, H, K, K]
        S = S @ transition + bt * torch.einsum("bhv,bhk->bhvk", vt, kt)
        out.append(torch.einsum("bhvk,bhk->bhv", S, q[:, t]))
    return torch.stack(out, 1), S


def test_matches_paper():
    torch.manual_seed(0)
    B, T, H, K, V = 2, 13, 2, 6, 5
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    g, beta = log_decay(B, T, H), torch.rand(B, T, H, dtype=torch.float64)
    S0 = randn(B, H, K, V)
    o, final = run_spec("gated_deltanet", dict(q=q, k=k, v=v, g=g, beta=beta), {"S": S0})
    o_ref, S_ref = reference(q, k, v, g, beta, S0.transpose(-1, -2))
    assert_close(o, o_ref, what="o")
    assert_close(final["S"], S_ref.transpose(-1, -2), what="S")


def test_gradcheck():
    torch.manual_seed(1)
    B, T, H, K, V = 1, 3, 1, 2, 3
    t = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V),
             g=log_decay(B, T, H), beta=torch.rand(B, T, H, dtype=torch.float64))
    assert gradcheck_spec("gated_deltanet", t, {"S": randn(B, H, K, V)})
