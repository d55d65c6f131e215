"""cosformer vs Qin et al. (2022) eq. 7-9, in the quadratic form with the cos(pi/2 (i-j)/M)
reweighting (no decomposition). An initial state stands for a prefix of P tokens at positions
-P..-1 (state = its eq. 10-11 cos / sin sums), so the output must equal the quadratic form over
prefix + sequence."""

import math

import torch
from _util import assert_close, gradcheck_spec, randn, run_spec

EPS = 1e-6   # clamp of the denominator, as in the authors' implementation


def quadratic(q, k, v, M, pos):
    """o_i = sum_{j<=i} s_ij v_j / sum_{j<=i} s_ij, s_ij = relu(q_i).relu(k_j) cos(pi/2 (i-j)/M)."""
    T = q.shape[1]
    dist = pos[:, None] - pos[None, :]                                   # [T, T]
    w = torch.cos(math.pi / 2 * dist[None] / M[:, None, None])           # [H, T, T]
    s = torch.einsum("bihk,bjhk->bhij", torch.relu(q), torch.relu(k)) * w
    s = s * torch.tril(torch.ones(T, T, dtype=q.dtype))
    den = s.sum(-1).clamp_min(EPS)
    return (torch.einsum("bhij,bjhv->bihv", s, v) / den.transpose(1, 2)[..., None])


def states(k, v, M, pos):
    """The cos / sin sums of eq. 10-11 over the given tokens: Sc, Ss, zc, zs."""
    ang = math.pi / 2 * pos[None, :, None] / M[None, None, :]           # [1, T, H]
    c, s = torch.cos(ang)[..., None], torch.sin(ang)[..., None]
    kr = torch.relu(k)
    return (torch.einsum("bthk,bthv->bhkv", c * kr, v), torch.einsum("bthk,bthv->bhkv", s * kr, v),
            (c * kr).sum(1), (s * kr).sum(1))


def test_matches_paper_no_state():
    torch.manual_seed(0)
    B, T, H, K, V = 2, 13, 2, 6, 5
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    M = torch.tensor([13.0, 20.0], dtype=q.dtype)        # the horizon, M >= T
    o, final = run_spec("cosformer", dict(q=q, k=k, v=v, M=M))
    pos = torch.arange(T, dtype=q.dtype) + 1             # the paper's 1-based positions
    assert_close(o, quadratic(q, k, v, M, pos), what="o")
    for name, ref in zip(("Sc", "Ss", "zc", "zs"), states(k, v, M, pos - 1)):
        assert_close(final[name], ref, what=name)


def test_matches_paper_with_prefix_state():
    torch.manual_seed(1)
    B, P, T, H, K, V = 2, 4, 13, 2, 6, 5
    q, k, v = randn(B, P + T, H, K), randn(B, P + T, H, K), randn(B, P + T, H, V)
    M = torch.tensor([17.0, 30.0], dtype=q.dtype)        # M >= P + T
    pos = torch.arange(-P, T, dtype=q.dtype)
    init = dict(zip(("Sc", "Ss", "zc", "zs"), states(k[:, :P], v[:, :P], M, pos[:P])))
    o, final = run_spec("cosformer", dict(q=q[:, P:], k=k[:, P:], v=v[:, P:], M=M), init)
    assert_close(o, quadratic(q, k, v, M, pos)[:, P:], what="o")
    for name, ref in zip(("Sc", "Ss", "zc", "zs"), states(k, v, M, pos)):
        assert_close(final[name], ref, what=name)


def test_gradcheck():
    torch.manual_seed(2)
    B, T, H, K, V = 1, 3, 1, 2, 3
    t = dict(q=randn(B, T, H, K).abs() + 0.1, k=randn(B, T, H, K).abs() + 0.1,
             v=randn(B, T, H, V), M=torch.tensor([4.0], dtype=torch.float64))
    init = {"Sc": randn(B, H, K, V), "Ss": randn(B, H, K, V),
            "zc": randn(B, H, K).abs() + 1, "zs": randn(B, H, K).abs() + 1}
    assert gradcheck_spec("cosformer", t, init)
