"""mamba2 vs Dao & Gu (2024), SSD: the quadratic (1-semiseparable matrix) form and the
recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = C_t^T h_t + D x_t."""

import torch
import torch.nn.functional as F
from _util import assert_close, gradcheck_spec, randn, run_spec


def _inputs(B=2, T=13, H=2, K=6, V=5):
    # A = -exp(A_log), A in [1, 16] at init (Mamba-2); dt_bias = softplus^-1 of dt in
    # [1e-3, 1e-1]; raw dt from the projection ~ N(0, 1).
    A = -torch.empty(H, dtype=torch.float64).uniform_(1, 16)
    dt0 = torch.exp(torch.empty(H, dtype=torch.float64).uniform_(-6.9, -2.3))
    dt_bias = dt0 + torch.log(-torch.expm1(-dt0))
    return dict(x=randn(B, T, H, V), B=randn(B, T, H, K), C=randn(B, T, H, K),
                dt=randn(B, T, H), A=A, D=randn(H), dt_bias=dt_bias)


def quadratic(x, B, C, dt, A, D, dt_bias, S0):
    """y = M x + D x, M_ji = C_j^T B_i exp(sum_{s=i+1}^{j} dt_s A) dt_i for j >= i (SSD)."""
    dt = F.softplus(dt + dt_bias)                        # [B, T, H]
    a = torch.cumsum(dt * A, dim=1)                      # log of prod_{s<=t} exp(dt_s A)
    seg = a[:, :, None, :] - a[:, None, :, :]            # [B, j, i, H]
    T = x.shape[1]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, :, :, None]
    L = torch.where(causal, torch.exp(seg.masked_fill(~causal, 0)), torch.zeros(()))
    M = torch.einsum("bjhn,bihn->bjih", C, B) * L * dt[:, None, :, :]
    y = torch.einsum("bjih,bihp->bjhp", M, x) + D[:, None] * x
    y = y + torch.einsum("bjhn,bhnp,bjh->bjhp", C, S0, torch.exp(a))
    return y


def recurrent(x, B, C, dt, A, D, dt_bias, S0):
    dt = F.softplus(dt + dt_bias)
    h, out = S0.clone(), []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t] * A)[..., None, None] * h + torch.einsum(
            "bhn,bhp->bhnp", B[:, t], dt[:, t, :, None] * x[:, t])
        out.append(torch.einsum("bhn,bhnp->bhp", C[:, t], h) + D[:, None] * x[:, t])
    return torch.stack(out, 1), h


def test_matches_paper():
    torch.manual_seed(0)
    t = _inputs()
    S0 = randn(2, 2, 6, 5)
    o, final = run_spec("mamba2", t, {"S": S0})
    assert_close(o, quadratic(**t, S0=S0), what="o (quadratic form)")
    o_ref, S_ref = recurrent(**t, S0=S0)
    assert_close(o, o_ref, what="o (recurrence)")
    assert_close(final["S"], S_ref, what="S")


def test_gradcheck():
    torch.manual_seed(1)
    t = _inputs(1, 3, 2, 2, 3)
    t["A"] = -torch.empty(2, dtype=torch.float64).uniform_(0.5, 2)
    assert gradcheck_spec("mamba2", t, {"S": randn(1, 2, 2, 3)})
