"""flatten vs Han et al. (2023) eq. 3, 5, 6 in the global (matrix) form, without the DWC branch.

    phi_p(x) = f_p(ReLU(x) + 1e-6),  f_p(x) = ||x|| / ||x^p|| x^p  (per head, p = 3),
    O = phi(Q) (phi(K)^T V) / (phi(Q) (phi(K)^T 1) + 1e-6),
with the 1e-6 offsets of the official code. Noncausal.
"""

import torch
from _util import global_normalized_attention, assert_close, gradcheck_spec, randn, run_spec


def focused(x, p=3):
    x = torch.relu(x) + 1e-6
    xp = x ** p
    return x.norm(dim=-1, keepdim=True) / xp.norm(dim=-1, keepdim=True) * xp


def reference(q, k, v, eps=1e-6):
    return global_normalized_attention(focused(q), focused(k), v, eps)


def test_matches_paper():
    torch.manual_seed(0)
    B, T, H, K, V = 2, 13, 2, 6, 5
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    o, final = run_spec("flatten", dict(q=q, k=k, v=v))
    o_ref, kv, ksum = reference(q, k, v)
    assert_close(o, o_ref, what="o")
    assert_close(final["S"], kv, what="S")
    assert_close(final["z"], ksum, what="z")


def test_focusing_keeps_norm_and_sharpens():
    """f_p keeps ||x|| and moves x toward its largest channel (the paper's two properties)."""
    x = torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float64)
    y = focused(x)
    xr = torch.relu(x) + 1e-6
    assert_close(y.norm(dim=-1), xr.norm(dim=-1), what="norm")
    assert (y / y.norm())[0, 2] > (xr / xr.norm())[0, 2]


def test_gradcheck():
    torch.manual_seed(1)
    B, T, H, K, V = 1, 3, 1, 2, 3
    # away from the ReLU kink, with at least some positive channels
    t = dict(q=randn(B, T, H, K).abs() + 0.1, k=randn(B, T, H, K).abs() + 0.1,
             v=randn(B, T, H, V))
    t["q"][0, 0, 0, 0] = -0.7
    assert gradcheck_spec("flatten", t)
