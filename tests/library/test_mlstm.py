"""mlstm vs Beck et al. (2024), xLSTM eq. 19-27, written WITH the paper's stabilizer state m_t
(the form of its stabilized recurrent implementation, without the code's extra eps = 1e-6):

    m_t  = max(log f_t + m_{t-1}, i~_t),
    i'_t = exp(i~_t - m_t),  f'_t = exp(log f_t + m_{t-1} - m_t)
    C'_t = f'_t C'_{t-1} + i'_t v_t k_t^T,  n'_t = f'_t n'_{t-1} + i'_t k_t
    h_t  = C'_t q_t / max(|n'_t^T q_t|, exp(-m_t))

By induction C'_t = exp(-m_t) C_t and n'_t = exp(-m_t) n_t for the unstabilized C_t, n_t of the
spec (if it holds at t - 1: f'_t C'_{t-1} = f_t exp(-m_t) C_{t-1}, i'_t = i_t exp(-m_t)), so
h_t = exp(-m_t) C_t q_t / (exp(-m_t) max(|n_t^T q_t|, 1)) = C_t q_t / max(|n_t^T q_t|, 1):
the stabilized output equals the spec's unstabilized output exactly (exp(-m_t) > 0).
"""

import torch
import torch.nn.functional as F
from _util import assert_close, gradcheck_spec, randn, run_spec


def stabilized(q, k, v, i, f, C0, n0, m0):
    """The paper's stabilized mLSTM; the carried state is (C'_0, n'_0, m_0)."""
    K = q.shape[-1]
    k = k / K ** 0.5
    log_f = F.logsigmoid(f)                      # f_t = sigmoid(f~_t)
    C, n, m, out = C0.clone(), n0.clone(), m0.clone(), []
    for t in range(q.shape[1]):
        m_new = torch.maximum(log_f[:, t] + m, i[:, t])
        i_s = torch.exp(i[:, t] - m_new)
        f_s = torch.exp(log_f[:, t] + m - m_new)
        C = f_s[..., None, None] * C + i_s[..., None, None] * torch.einsum(
            "bhk,bhv->bhkv", k[:, t], v[:, t])
        n = f_s[..., None] * n + i_s[..., None] * k[:, t]
        m = m_new
        num = torch.einsum("bhk,bhkv->bhv", q[:, t], C)
        den = torch.maximum(torch.einsum("bhk,bhk->bh", q[:, t], n).abs(), torch.exp(-m))
        out.append(num / den[..., None])
    return torch.stack(out, 1), C, n, m


def _inputs(B=2, T=13, H=2, K=6, V=5):
    # input gate pre-activation up to ~+5; forget gate pre-activation around a positive bias
    return dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V),
                i=torch.empty(B, T, H, dtype=torch.float64).uniform_(-5, 5),
                f=randn(B, T, H) + 3)


def test_matches_paper_stabilized():
    torch.manual_seed(0)
    B, H, K, V = 2, 2, 6, 5
    t = _inputs(B, 13, H, K, V)
    C0, n0 = randn(B, H, K, V), randn(B, H, K)
    m0 = torch.empty(B, H, dtype=torch.float64).uniform_(-2, 2)
    o, final = run_spec("mlstm", t, {"C": C0, "n": n0})
    # the stabilized reference carries exp(-m0) C0, exp(-m0) n0 for the same unstabilized state
    e = torch.exp(-m0)
    h, C_s, n_s, m = stabilized(**t, C0=e[..., None, None] * C0, n0=e[..., None] * n0, m0=m0)
    assert_close(o, h, what="h")
    assert_close(final["C"], torch.exp(m)[..., None, None] * C_s, what="C")
    assert_close(final["n"], torch.exp(m)[..., None] * n_s, what="n")


def test_matches_paper_from_zero_state():
    torch.manual_seed(1)
    t = _inputs()
    o, _ = run_spec("mlstm", t)
    z = dict(dtype=torch.float64)
    h, *_ = stabilized(**t, C0=torch.zeros(2, 2, 6, 5, **z), n0=torch.zeros(2, 2, 6, **z),
                       m0=torch.zeros(2, 2, **z))
    assert_close(o, h, what="h")


def test_gradcheck():
    torch.manual_seed(2)
    t = _inputs(1, 3, 1, 2, 3)
    t["i"] = t["i"] / 5
    assert gradcheck_spec("mlstm", t, {"C": randn(1, 1, 2, 3), "n": randn(1, 1, 2)})
