"""retnet vs Sun et al. (2023): the parallel form (eq. 5) and the recurrent form (eq. 6)."""

import torch
from _util import assert_close, gradcheck_spec, randn, run_spec


def gammas(H):
    """gamma_h = 1 - 2^(-5 - h), h = 0 .. H-1 (section 2.2, multi-scale retention)."""
    return 1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64))


def parallel(q, k, v, S0=None):
    """Retention(X) = (Q K^T (.) D) V, D_nm = gamma^(n - m) for n >= m else 0 (eq. 5).

    Keys scaled by d^-1/2. A carried state enters as in the chunkwise form (eq. 7): the
    cross-chunk term (Q R_{i-1}) (.) xi with xi_n = gamma^(n + 1) (0-based n).
    """
    B, T, H, K = q.shape
    k = k * K ** -0.5
    n = torch.arange(T, dtype=torch.float64)
    g = gammas(H)[:, None, None]                                        # [H, 1, 1]
    diff = n[:, None] - n[None, :]
    D = torch.where(diff >= 0, g ** diff.clamp_min(0), torch.zeros(()))  # [H, T, T]
    scores = torch.einsum("bnhk,bmhk->bhnm", q, k) * D
    o = torch.einsum("bhnm,bmhv->bnhv", scores, v)
    # state after the sequence: R = sum_m gamma^(T-1-m) k_m^T v_m (+ gamma^T S0)
    zeta = gammas(H)[None, :] ** (T - 1 - n)[:, None]                   # [T, H]
    S = torch.einsum("bmhk,mh,bmhv->bhkv", k, zeta, v)
    if S0 is not None:
        xi = gammas(H)[None, :] ** (n + 1)[:, None]                     # [T, H]
        o = o + torch.einsum("bnhk,bhkv,nh->bnhv", q, S0, xi)
        S = S + gammas(H)[None, :, None, None] ** T * S0
    return o, S


def recurrent(q, k, v, S0):
    """S_n = gamma S_{n-1} + k_n^T v_n,  o_n = q_n S_n (eq. 6)."""
    K = q.shape[-1]
    g = gammas(q.shape[2])[None, :, None, None]
    S, out = S0.clone(), []
    for t in range(q.shape[1]):
        S = g * S + torch.einsum("bhk,bhv->bhkv", k[:, t] * K ** -0.5, v[:, t])
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1), S


def _inputs(B=2, T=13, H=2, K=6, V=5):
    return dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V))


def test_matches_parallel_form():
    torch.manual_seed(0)
    t = _inputs()
    o, final = run_spec("retnet", t)
    o_ref, S_ref = parallel(**t)
    assert_close(o, o_ref, what="o")
    assert_close(final["S"], S_ref, what="S")


def test_matches_parallel_and_recurrent_with_initial_state():
    torch.manual_seed(1)
    t = _inputs(H=3)
    S0 = randn(2, 3, 6, 5)
    o, final = run_spec("retnet", t, {"S": S0})
    for o_ref, S_ref in (parallel(**t, S0=S0), recurrent(**t, S0=S0)):
        assert_close(o, o_ref, what="o")
        assert_close(final["S"], S_ref, what="S")


def test_gradcheck():
    torch.manual_seed(2)
    assert gradcheck_spec("retnet", _inputs(1, 3, 2, 2, 3), {"S": randn(1, 2, 2, 3)})
