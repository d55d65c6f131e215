"""performer vs Choromanski et al. (2021): FAVOR+ positive random features, written in the
paper's quadratic form D^-1 (Q' K'^T masked) V with explicit prefix state terms."""

import torch
from _util import assert_close, gradcheck_spec, randn, run_spec


def features(x, W):
    """phi(x) = exp(w_i . x - |x|^2 / 2) / sqrt(m), x already scaled by d^-1/4 (Lemma 1)."""
    m = W.shape[1]
    wx = torch.einsum("hmk,bthk->bthm", W, x)
    return torch.exp(wx - (x * x).sum(-1, keepdim=True) / 2) / m ** 0.5


def reference(q, k, v, W, S0, z0):
    d = q.shape[-1]
    qp, kp = features(q * d ** -0.25, W), features(k * d ** -0.25, W)
    T = q.shape[1]
    A = torch.einsum("bihm,bjhm->bhij", qp, kp) * torch.tril(torch.ones(T, T, dtype=q.dtype))
    num = torch.einsum("bhij,bjhv->bihv", A, v) + torch.einsum("bihm,bhmv->bihv", qp, S0)
    den = A.sum(-1).transpose(1, 2) + torch.einsum("bihm,bhm->bih", qp, z0)
    S = S0 + torch.einsum("bjhm,bjhv->bhmv", kp, v)
    z = z0 + kp.sum(1)
    return num / den[..., None], S, z


def test_matches_paper():
    torch.manual_seed(0)
    B, T, H, K, V, M = 2, 13, 2, 6, 5, 8
    W = randn(H, M, K)
    pre = dict(q=randn(B, 4, H, K), k=randn(B, 4, H, K), v=randn(B, 4, H, V))
    zero_S, zero_z = torch.zeros(B, H, M, V, dtype=W.dtype), torch.zeros(B, H, M, dtype=W.dtype)
    _, S0, z0 = reference(**pre, W=W, S0=zero_S, z0=zero_z)   # a realistic prefix state
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    o, final = run_spec("performer", dict(q=q, k=k, v=v, W=W), {"S": S0, "z": z0})
    o_ref, S_ref, z_ref = reference(q, k, v, W, S0, z0)
    assert_close(o, o_ref, what="o")
    assert_close(final["S"], S_ref, what="S")
    assert_close(final["z"], z_ref, what="z")


def test_estimates_softmax_kernel():
    """Lemma 1: with many features phi(q).phi(k) -> exp(q.k / sqrt(d))."""
    torch.manual_seed(2)
    d, m = 4, 200000
    q, k = randn(1, 1, 1, d) * 0.5, randn(1, 1, 1, d) * 0.5
    W = randn(1, m, d)
    est = (features(q * d ** -0.25, W) * features(k * d ** -0.25, W)).sum()
    exact = torch.exp((q * k).sum() / d ** 0.5)
    assert abs(est / exact - 1) < 2e-2


def test_gradcheck():
    torch.manual_seed(1)
    B, T, H, K, V, M = 1, 3, 1, 2, 3, 3
    t = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V), W=randn(H, M, K))
    assert gradcheck_spec("performer", t, {"S": randn(B, H, M, V),
                                           "z": randn(B, H, M).abs() + 1})
