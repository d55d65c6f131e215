"""hgrn2 vs Qin et al. (2024), sec. 3.2: h_t = Diag(f_t) h_{t-1} + (1 - f_t) (x) i_t,
y_t = o_t h_t, written as a loop over time with the forget gate itself (not its log)."""

import torch
from _util import assert_close, gradcheck_spec, randn, run_spec


def _gates(B, T, H, K, lower_bound=0.3):
    """f_t = lb + (1 - lb) sigmoid(x): HGRN's lower-bounded forget gate, in (lb, 1)."""
    return lower_bound + (1 - lower_bound) * torch.sigmoid(randn(B, T, H, K))


def reference(o_gate, i, f, h0):
    h, out = h0.clone(), []
    for t in range(o_gate.shape[1]):
        h = f[:, t, :, :, None] * h + torch.einsum("bhk,bhv->bhkv", 1 - f[:, t], i[:, t])
        out.append(torch.einsum("bhk,bhkv->bhv", o_gate[:, t], h))
    return torch.stack(out, 1), h


def test_matches_paper():
    torch.manual_seed(0)
    B, T, H, K, V = 2, 13, 2, 6, 5
    q, i, f = torch.sigmoid(randn(B, T, H, K)), randn(B, T, H, V), _gates(B, T, H, K)
    h0 = randn(B, H, K, V)
    o, final = run_spec("hgrn2", dict(q=q, v=i, g=torch.log(f)), {"S": h0})
    o_ref, h_ref = reference(q, i, f, h0)
    assert_close(o, o_ref, what="o")
    assert_close(final["S"], h_ref, what="S")


def test_gradcheck():
    torch.manual_seed(1)
    B, T, H, K, V = 1, 3, 1, 2, 3
    t = dict(q=randn(B, T, H, K), v=randn(B, T, H, V), g=torch.log(_gates(B, T, H, K)))
    assert gradcheck_spec("hgrn2", t, {"S": randn(B, H, K, V)})
