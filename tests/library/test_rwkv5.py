"""rwkv5 vs Peng et al. (2024), Eagle Time Mixing (eq. 5-6), written as the paper's explicit sum
wkv_t = diag(u) k_t^T v_t + sum_{i<t} diag(w)^(t-1-i) k_i^T v_i,  o_t = r_t wkv_t,
w = exp(-exp(omega)) per head and channel, with the carried state S0 decayed by w^t (0-based t)."""

import torch
from _util import assert_close, gradcheck_spec, randn, run_spec


def _inputs(B=2, T=13, H=2, K=6, V=5):
    # omega such that w = exp(-exp(omega)) lies in (0.5, 0.999)
    w = torch.empty(H, K, dtype=torch.float64).uniform_(0.5, 0.999)
    return dict(r=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V),
                omega=torch.log(-torch.log(w)), u=randn(H, K))


def reference(r, k, v, omega, u, S0):
    w = torch.exp(-torch.exp(omega))                       # eq. 5, [H, K] in (0, 1)
    T = r.shape[1]
    out = []
    for t in range(T):
        wkv = torch.einsum("hk,bhk,bhv->bhkv", u, k[:, t], v[:, t])
        for i in range(t):
            wkv = wkv + torch.einsum("hk,bhk,bhv->bhkv", w ** (t - 1 - i), k[:, i], v[:, i])
        wkv = wkv + (w ** t)[..., None] * S0
        out.append(torch.einsum("bhk,bhkv->bhv", r[:, t], wkv))
    # state after the last token: sum_i diag(w)^(T-1-i) k_i^T v_i + diag(w)^T S0
    S = (w ** T)[..., None] * S0
    for i in range(T):
        S = S + torch.einsum("hk,bhk,bhv->bhkv", w ** (T - 1 - i), k[:, i], v[:, i])
    return torch.stack(out, 1), S


def test_matches_paper():
    torch.manual_seed(0)
    t = _inputs()
    S0 = randn(2, 2, 6, 5)
    o, final = run_spec("rwkv5", t, {"S": S0})
    o_ref, S_ref = reference(**t, S0=S0)
    assert_close(o, o_ref, what="o")
    assert_close(final["S"], S_ref, what="S")


def test_gradcheck():
    torch.manual_seed(1)
    assert gradcheck_spec("rwkv5", _inputs(1, 3, 1, 2, 3), {"S": randn(1, 1, 2, 3)})
