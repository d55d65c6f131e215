"""gated_rfa vs Peng et al. (2021) eq. 2 and 7: a loop over time with the concatenated random
Fourier features phi(x) = [sin(W x), cos(W x)] / sqrt(D) in one state, split only to compare."""

import torch
from _util import assert_close, gradcheck_spec, l2normalize, randn, run_spec


def phi(x, W):
    wx = torch.einsum("hmk,bhk->bhm", W, x)
    return torch.cat([torch.sin(wx), torch.cos(wx)], -1) / W.shape[1] ** 0.5


def reference(q, k, v, g_logit, W, S0, z0):
    S, z, out = S0.clone(), z0.clone(), []
    for t in range(q.shape[1]):
        g = torch.sigmoid(g_logit[:, t])[..., None]                       # [B, H, 1]
        fk, fq = phi(k[:, t], W), phi(q[:, t], W)
        S = g[..., None] * S + (1 - g[..., None]) * torch.einsum("bhm,bhv->bhmv", fk, v[:, t])
        z = g * z + (1 - g) * fk
        num = torch.einsum("bhm,bhmv->bhv", fq, S)
        out.append(num / (fq * z).sum(-1, keepdim=True))
    return torch.stack(out, 1), S, z


def split(S, z, M):
    return {"Ss": S[:, :, :M], "Sc": S[:, :, M:], "zs": z[:, :, :M], "zc": z[:, :, M:]}


def test_matches_paper():
    torch.manual_seed(0)
    B, T, H, K, V, M = 2, 13, 2, 6, 5, 16
    W = randn(H, M, K)                                  # w_i ~ N(0, I), sigma = 1
    P = 4                                               # a prefix gives a realistic state
    pre = [l2normalize(randn(B, P, H, K)), l2normalize(randn(B, P, H, K)), randn(B, P, H, V),
           randn(B, P, H)]
    _, S0, z0 = reference(*pre, W, torch.zeros(B, H, 2 * M, V, dtype=W.dtype),
                          torch.zeros(B, H, 2 * M, dtype=W.dtype))
    q, k = l2normalize(randn(B, T, H, K)), l2normalize(randn(B, T, H, K))
    v, g = randn(B, T, H, V), randn(B, T, H)
    o, final = run_spec("gated_rfa", dict(q=q, k=k, v=v, g=g, W=W), split(S0, z0, M))
    o_ref, S_ref, z_ref = reference(q, k, v, g, W, S0, z0)
    assert_close(o, o_ref, what="o")
    for name, ref in split(S_ref, z_ref, M).items():
        assert_close(final[name], ref, what=name)


def test_gradcheck():
    torch.manual_seed(1)
    B, T, H, K, V, M = 1, 3, 1, 2, 3, 3
    W = randn(H, M, K) * 0.3
    t = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V), g=randn(B, T, H),
             W=W)
    S0, z0 = torch.zeros(B, H, 2 * M, V, dtype=W.dtype), torch.zeros(B, H, 2 * M, dtype=W.dtype)
    z0[..., M:] = 1.0                                  # cos features of earlier tokens near 1
    S0 = S0 + randn(B, H, 2 * M, V) * 0.1
    assert gradcheck_spec("gated_rfa", t, split(S0, z0, M))
