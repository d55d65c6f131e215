"""lightning_attention vs Qin et al. (2024) eq. 1: O = (Q K^T * M) V with the decay mask
M_ts = lambda^(t-s) for s <= t, plus the carried state decayed by lambda^(t+1)."""

import torch
from _util import assert_close, gradcheck_spec, randn, run_spec


def reference(q, k, v, lam, kv0):
    T = q.shape[1]
    t = torch.arange(T, dtype=q.dtype)
    diff = t[:, None] - t[None, :]
    mask = torch.where(diff >= 0, lam[:, None, None] ** diff.clamp_min(0), 0.0)   # [H, T, T]
    o = torch.einsum("bthk,bshk,hts,bshv->bthv", q, k, mask, v)
    o = o + torch.einsum("bthk,bhkv,th->bthv", q, kv0, lam[None, :] ** (t[:, None] + 1))
    last = lam[None, :] ** (T - 1 - t[:, None])                                     # [T, H]
    kv = lam[None, :, None, None] ** T * kv0 + torch.einsum("bshk,bshv,sh->bhkv", k, v, last)
    return o, kv


def test_matches_paper():
    torch.manual_seed(0)
    B, T, H, K, V = 2, 13, 2, 6, 5
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    lam = torch.empty(H, dtype=torch.float64).uniform_(0.5, 0.999)
    kv0 = randn(B, H, K, V)
    o, final = run_spec("lightning_attention", dict(q=q, k=k, v=v, lam=lam), {"kv": kv0})
    o_ref, kv_ref = reference(q, k, v, lam, kv0)
    assert_close(o, o_ref, what="o")
    assert_close(final["kv"], kv_ref, what="kv")


def test_gradcheck():
    torch.manual_seed(1)
    B, T, H, K, V = 1, 3, 1, 2, 3
    t = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V),
             lam=torch.tensor([0.8], dtype=torch.float64))
    assert gradcheck_spec("lightning_attention", t, {"kv": randn(B, H, K, V)})
