"""based vs Arora et al. (2024): the 2nd-order Taylor kernel 1 + x + x^2/2 of q.k / sqrt(d),
written in the quadratic form (the kernel evaluated directly, no feature map), plus the
paper's feature map phi(x) = [1, x, vec(x x^T) / sqrt(2)] only for the carried state."""

import torch
from _util import assert_close, gradcheck_spec, randn, run_spec


def phi(x):
    """[1, x, vec(x x^T) / sqrt(2)] over the last dim (row-major vec)."""
    quad = (x[..., :, None] * x[..., None, :]).flatten(-2) / 2 ** 0.5
    return torch.cat([torch.ones_like(x[..., :1]), x, quad], -1)


def reference(q, k, v, S0, z0):
    d, T = q.shape[-1], q.shape[1]
    dot = torch.einsum("bihk,bjhk->bhij", q, k) / d ** 0.5
    A = (1 + dot + dot ** 2 / 2) * torch.tril(torch.ones(T, T, dtype=q.dtype))
    fq, fk = phi(q * d ** -0.25), phi(k * d ** -0.25)
    num = torch.einsum("bhij,bjhv->bihv", A, v) + torch.einsum("bihf,bhfv->bihv", fq, S0)
    den = A.sum(-1).transpose(1, 2) + torch.einsum("bihf,bhf->bih", fq, z0)
    S = S0 + torch.einsum("bjhf,bjhv->bhfv", fk, v)
    return num / den[..., None], S, z0 + fk.sum(1)


def test_kernel_identity():
    """phi(q).phi(k) = 1 + q.k + (q.k)^2 / 2 (section 3)."""
    torch.manual_seed(3)
    q, k = randn(5, 4), randn(5, 4)
    dot = (q * k).sum(-1)
    assert_close((phi(q) * phi(k)).sum(-1), 1 + dot + dot ** 2 / 2, what="kernel")


def test_matches_paper():
    torch.manual_seed(0)
    B, T, H, K, V = 2, 13, 2, 4, 5
    F = 1 + K + K * K
    zS, zz = torch.zeros(B, H, F, V, dtype=torch.float64), torch.zeros(B, H, F, dtype=torch.float64)
    _, S0, z0 = reference(randn(B, 4, H, K), randn(B, 4, H, K), randn(B, 4, H, V), zS, zz)
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    o, final = run_spec("based", dict(q=q, k=k, v=v), {"S": S0, "z": z0})
    o_ref, S_ref, z_ref = reference(q, k, v, S0, z0)
    assert_close(o, o_ref, what="o")
    assert_close(final["S"], S_ref, what="S")
    assert_close(final["z"], z_ref, what="z")


def test_gradcheck():
    torch.manual_seed(1)
    B, T, H, K, V = 1, 3, 1, 2, 3
    F = 1 + K + K * K
    t = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V))
    z0 = torch.zeros(B, H, F, dtype=torch.float64)
    z0[..., 0] = 2.0                                   # two earlier tokens' constant feature
    assert gradcheck_spec("based", t, {"S": randn(B, H, F, V), "z": z0})
