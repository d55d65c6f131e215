"""rwkv7 vs the wkv state update of RWKV-7 "Goose" (Peng et al., 2025), a loop over time.

In the paper's layout the state wkv_t is [V, K] (values on rows) and multiplies from the left:
    wkv_t = wkv_{t-1} (diag(w_t) - kappa_hat_t^T (a_t * kappa_hat_t)) + v_t^T k_t,
    y_t = wkv_t r_t^T,
with kappa_hat L2-normalized, the in-context learning rate a_t in (0, 1) and the decay
w_t = exp(-e^-0.5 sigmoid(.)) in (0.545, 1). The spec keeps S[K, V] = wkv^T and is called
with its a = -kappa_hat, b = kappa_hat * a_t and its w = log(w_t).
"""

import torch
from _util import assert_close, gradcheck_spec, l2normalize, log_decay, randn, run_spec


def reference(r, w, k, v, kappa_hat, a_in, wkv0):
    """r, w, k, kappa_hat, a_in [B, T, H, K], v [B, T, H, V], wkv0 [B, H, V, K]; w = decay."""
    wkv, out = wkv0.clone(), []
    for t in range(r.shape[1]):
        kh = kappa_hat[:, t]
        transition = (torch.diag_embed(w[:, t])
                      - torch.einsum("bhi,bhj->bhij", kh, a_in[:, t] * kh))      # [B, H, K, K]
        wkv = wkv @ transition + torch.einsum("bhv,bhk->bhvk", v[:, t], k[:, t])
        out.append(torch.einsum("bhvk,bhk->bhv", wkv, r[:, t]))                 # wkv_t r_t^T
    return torch.stack(out, 1), wkv


def _inputs(B, T, H, K, V):
    kappa_hat = l2normalize(randn(B, T, H, K))
    a_in = torch.rand(B, T, H, K, dtype=torch.float64)
    logw = log_decay(B, T, H, K, low=0.545, high=0.999)
    spec = dict(r=randn(B, T, H, K), w=logw, k=randn(B, T, H, K), v=randn(B, T, H, V),
                a=-kappa_hat, b=kappa_hat * a_in)
    return spec, kappa_hat, a_in


def test_matches_paper():
    torch.manual_seed(0)
    B, T, H, K, V = 2, 13, 2, 6, 5
    t, kappa_hat, a_in = _inputs(B, T, H, K, V)
    S0 = randn(B, H, K, V)
    o, final = run_spec("rwkv7", t, {"S": S0})
    o_ref, wkv = reference(t["r"], torch.exp(t["w"]), t["k"], t["v"], kappa_hat, a_in,
                           S0.transpose(-1, -2))
    assert_close(o, o_ref, what="o")
    assert_close(final["S"], wkv.transpose(-1, -2), what="S")


def test_gradcheck():
    torch.manual_seed(1)
    t, _, _ = _inputs(1, 3, 1, 2, 3)
    assert gradcheck_spec("rwkv7", t, {"S": randn(1, 1, 2, 3)})
