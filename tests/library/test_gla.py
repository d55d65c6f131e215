"""gla vs Yang et al. (2024): the parallel form with cumulative log decays (eq. 4-5)
O = ((Q (.) B)(K / B)^T (.) M) V, b_t = prod_{s<=t} alpha_s, and the recurrence (eq. 3)."""

import torch
import torch.nn.functional as F
from _util import assert_close, gradcheck_spec, randn, run_spec


def _inputs(B=2, T=13, H=2, K=6, V=5):
    # alpha = sigmoid(x W + b)^(1/tau), tau = 16: log alpha = logsigmoid(.) / 16
    return dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V),
                g=F.logsigmoid(randn(B, T, H, K)) / 16)


def parallel(q, k, v, g, S0):
    """o_t = sum_{s<=t} (q_t (.) b_t / b_s) k_s^T v_s + (q_t (.) b_t) S0, in log space."""
    K, T = q.shape[-1], q.shape[1]
    q = q * K ** -0.5
    G = torch.cumsum(g, dim=1)                                     # log b_t
    seg = G[:, :, None] - G[:, None, :]                             # [B, t, s, H, K]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, :, :, None, None]
    decay = torch.where(causal, torch.exp(seg.masked_fill(~causal, 0)), torch.zeros(()))
    P = torch.einsum("bthk,btshk,bshk->bhts", q, decay, k)
    o = torch.einsum("bhts,bshv->bthv", P, v)
    o = o + torch.einsum("bthk,bhkv->bthv", q * torch.exp(G), S0)
    S = torch.exp(G[:, -1])[..., None] * S0 + torch.einsum(
        "bshk,bshv->bhkv", torch.exp(G[:, -1:] - G) * k, v)
    return o, S


def recurrent(q, k, v, g, S0):
    """S_t = Diag(alpha_t) S_{t-1} + k_t^T v_t,  o_t = q_t S_t (queries scaled d_k^-1/2)."""
    K = q.shape[-1]
    S, out = S0.clone(), []
    for t in range(q.shape[1]):
        S = torch.exp(g[:, t])[..., None] * S + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * K ** -0.5, S))
    return torch.stack(out, 1), S


def test_matches_paper():
    torch.manual_seed(0)
    t = _inputs()
    S0 = randn(2, 2, 6, 5)
    o, final = run_spec("gla", t, {"S": S0})
    for o_ref, S_ref in (parallel(**t, S0=S0), recurrent(**t, S0=S0)):
        assert_close(o, o_ref, what="o")
        assert_close(final["S"], S_ref, what="S")


def test_gradcheck():
    torch.manual_seed(1)
    assert gradcheck_spec("gla", _inputs(1, 3, 1, 2, 3), {"S": randn(1, 1, 2, 3)})
