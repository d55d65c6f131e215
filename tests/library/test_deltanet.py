"""deltanet vs the delta rule of Schlag et al. (2021) / Yang et al. (2024), a loop over time.

Written in the layout of Yang et al. (2024), S_t in R^{V x K}, o_t = S_t q_t:
    S_t = S_{t-1} - beta_t (S_{t-1} k_t - v_t) k_t^T,
with q, k L2-normalized (x / sqrt(||x||^2 + 1e-6), as fla's kernels) and q scaled by K^-1/2.
"""

import torch
from _util import assert_close, gradcheck_spec, randn, run_spec


def l2norm(x, eps=1e-6):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


def reference(q, k, v, beta, S0_vk):
    """q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H], S0_vk [B, H, V, K] (paper layout)."""
    q, k = l2norm(q) * q.shape[-1] ** -0.5, l2norm(k)
    S, out = S0_vk.clone(), []
    for t in range(q.shape[1]):
        kt, vt, bt = k[:, t], v[:, t], beta[:, t, :, None, None]
        pred = torch.einsum("bhvk,bhk->bhv", S, kt)             # S_{t-1} k_t
        S = S - bt * torch.einsum("bhv,bhk->bhvk", pred - vt, kt)
        out.append(torch.einsum("bhvk,bhk->bhv", S, q[:, t]))    # S_t q_t
    return torch.stack(out, 1), S


def _check(beta_high):
    B, T, H, K, V = 2, 13, 2, 6, 5
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    beta = torch.rand(B, T, H, dtype=torch.float64) * beta_high
    S0 = randn(B, H, K, V)
    o, final = run_spec("deltanet", dict(q=q, k=k, v=v, beta=beta), {"S": S0})
    o_ref, S_ref = reference(q, k, v, beta, S0.transpose(-1, -2))
    assert_close(o, o_ref, what="o")
    assert_close(final["S"], S_ref.transpose(-1, -2), what="S")


def test_matches_paper():
    torch.manual_seed(0)
    _check(beta_high=1.0)      # beta in (0, 1), as the model's sigmoid


def test_matches_paper_beta_up_to_two():
    torch.manual_seed(2)
    _check(beta_high=2.0)      # beta in (0, 2): negative eigenvalues (2 sigmoid)


def test_gradcheck():
    torch.manual_seed(1)
    B, T, H, K, V = 1, 3, 1, 2, 3
    t = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V),
             beta=torch.rand(B, T, H, dtype=torch.float64))
    assert gradcheck_spec("deltanet", t, {"S": randn(B, H, K, V)})
