"""rwkv6 vs Peng et al. (2024), Finch wkv (eq. 19-20), written as the paper's explicit sum
wkv_t = diag(u) k_t^T v_t + sum_{i<t} diag(prod_{j=i+1}^{t-1} w_j) k_i^T v_i,  o_t = r_t wkv_t,
with the carried state S0 decayed by prod_{j=1}^{t-1} w_j, and w_t = exp(-exp(d_t))."""

import torch
from _util import assert_close, gradcheck_spec, randn, run_spec


def _inputs(B=2, T=13, H=2, K=6, V=5):
    d = torch.empty(B, T, H, K, dtype=torch.float64).uniform_(-3, 1)   # decay pre-activation
    return dict(r=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V),
                w=-torch.exp(d), u=randn(H, K))


def reference(r, k, v, w, u, S0):
    decay = torch.exp(w)                                   # w_t in (0, 1)
    B, T, H, K = r.shape
    out = []
    for t in range(T):
        wkv = torch.einsum("hk,bhk,bhv->bhkv", u, k[:, t], v[:, t])
        for i in range(t):
            prod = torch.ones(B, H, K, dtype=r.dtype)
            for j in range(i + 1, t):
                prod = prod * decay[:, j]
            wkv = wkv + torch.einsum("bhk,bhk,bhv->bhkv", prod, k[:, i], v[:, i])
        prod0 = torch.ones(B, H, K, dtype=r.dtype)
        for j in range(t):
            prod0 = prod0 * decay[:, j]
        wkv = wkv + prod0[..., None] * S0
        out.append(torch.einsum("bhk,bhkv->bhv", r[:, t], wkv))
    # state after the last token: sum_i diag(prod_{j=i+1}^{T} w_j) k_i^T v_i + prod_{j<=T} w_j S0
    G = torch.cumsum(w, 1)
    S = torch.exp(G[:, -1])[..., None] * S0 + torch.einsum(
        "bihk,bihv->bhkv", torch.exp(G[:, -1:] - G) * k, v)
    return torch.stack(out, 1), S


def test_matches_paper():
    torch.manual_seed(0)
    t = _inputs()
    S0 = randn(2, 2, 6, 5)
    o, final = run_spec("rwkv6", t, {"S": S0})
    o_ref, S_ref = reference(**t, S0=S0)
    assert_close(o, o_ref, what="o")
    assert_close(final["S"], S_ref, what="S")


def test_gradcheck():
    torch.manual_seed(1)
    assert gradcheck_spec("rwkv6", _inputs(1, 3, 1, 2, 3), {"S": randn(1, 1, 2, 3)})
