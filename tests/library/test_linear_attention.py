"""linear_attention vs Katharopoulos et al. (2020) eq. 18-20, written as a loop over time."""

import torch
import torch.nn.functional as F
from _util import assert_close, gradcheck_spec, randn, run_spec


def reference(q, k, v, S0, z0, eps=1e-6):
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    S, z, out = S0.clone(), z0.clone(), []
    for t in range(q.shape[1]):
        S = S + torch.einsum("bhk,bhv->bhkv", phi_k[:, t], v[:, t])
        z = z + phi_k[:, t]
        num = torch.einsum("bhk,bhkv->bhv", phi_q[:, t], S)
        den = torch.einsum("bhk,bhk->bh", phi_q[:, t], z)[..., None] + eps
        out.append(num / den)
    return torch.stack(out, 1), S, z


def test_matches_paper():
    torch.manual_seed(0)
    B, T, H, K, V = 2, 13, 2, 6, 5
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    S0, z0 = randn(B, H, K, V), randn(B, H, K).abs()
    o, final = run_spec("linear_attention", dict(q=q, k=k, v=v), {"S": S0, "z": z0})
    o_ref, S_ref, z_ref = reference(q, k, v, S0, z0)
    assert_close(o, o_ref, what="o")
    assert_close(final["S"], S_ref, what="S")
    assert_close(final["z"], z_ref, what="z")


def test_gradcheck():
    torch.manual_seed(1)
    B, T, H, K, V = 1, 3, 1, 2, 3
    t = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V))
    assert gradcheck_spec("linear_attention", t, {"S": randn(B, H, K, V),
                                                  "z": randn(B, H, K).abs() + 1})
