"""linformer vs Wang et al. (2020), multi-head linear attention in matrix form:

    head = softmax(Q (E K)^T / sqrt(d_k)) (F V),   E, F [P, N] (k x n) per head,
with the keys and values of a sequence shorter than N zero-padded to N, so every one of the N
columns of E and F is used (the authors' code slices E and F to the length instead; the two
agree, which the spec's position-indexed params rely on). Noncausal.
"""

import pytest
import torch
from _util import assert_close, gradcheck_spec, randn, run_spec

import linforge


def reference(q, k, v, E, F):
    """q, k [B, T, H, K], v [B, T, H, V], E, F [H, N, P] (row n: the projection of position n).
    Returns o [B, T, H, V], (E K)^T [B, H, K, P], F V [B, H, P, V]."""
    B, T, H, K = k.shape
    N = E.shape[1]
    pad = (0, 0, 0, 0, 0, N - T)                                  # zero tokens T .. N-1
    Kn, Vn = torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)
    Kp = torch.einsum("hnp,bnhk->bhpk", E, Kn)                    # E K: [B, H, P, K]
    Vp = torch.einsum("hnp,bnhv->bhpv", F, Vn)                    # F V: [B, H, P, V]
    scores = torch.einsum("bthk,bhpk->bhtp", q, Kp) / K ** 0.5
    o = torch.einsum("bhtp,bhpv->bthv", torch.softmax(scores, dim=-1), Vp)
    return o, Kp.transpose(-1, -2), Vp


def test_matches_paper():
    torch.manual_seed(0)
    B, T, H, K, V, P, N = 2, 13, 2, 6, 5, 4, 16
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    E, F = randn(H, N, P, scale=N ** -0.5), randn(H, N, P, scale=N ** -0.5)
    o, final = run_spec("linformer", dict(q=q, k=k, v=v, E=E, F=F))
    o_ref, S, U = reference(q, k, v, E, F)
    assert_close(o, o_ref, what="o")
    assert_close(final["S"], S, what="S")
    assert_close(final["U"], U, what="U")


def test_full_length_and_shared_projection():
    """T = N uses every row; the paper's key-value sharing passes one tensor as E and F."""
    torch.manual_seed(1)
    B, T, H, K, V, P = 1, 8, 3, 4, 4, 3
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    E = randn(H, T, P)
    o, _ = run_spec("linformer", dict(q=q, k=k, v=v, E=E, F=E))
    assert_close(o, reference(q, k, v, E, E)[0], what="o")


def test_longer_sequence_than_the_maximum_is_an_error():
    torch.manual_seed(2)
    B, T, H, K, V, P, N = 1, 9, 1, 3, 3, 2, 8
    x = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V),
             E=randn(H, N, P), F=randn(H, N, P))
    with pytest.raises(ValueError, match=r"9 tokens, more than N = 8.*param 'E'"):
        run_spec("linformer", x)


def test_varlen_positions_restart_per_sequence():
    torch.manual_seed(3)
    lens, H, K, V, P, N = [5, 2, 6], 2, 3, 4, 3, 6
    E, F = randn(H, N, P), randn(H, N, P)
    parts = [dict(q=randn(1, n, H, K), k=randn(1, n, H, K), v=randn(1, n, H, V)) for n in lens]
    packed = {x: torch.cat([p[x] for p in parts], dim=1) for x in ("q", "k", "v")}
    cu = torch.tensor([0, 5, 7, 13])             # the packed total 13 exceeds N = 6: fine
    attn = linforge.library.get("linformer")
    o, _ = attn.reference(**packed, E=E, F=F, cu_seqlens=cu)
    for n, p in enumerate(parts):
        o_ref, _, _ = reference(p["q"], p["k"], p["v"], E, F)
        assert_close(o[:, int(cu[n]):int(cu[n + 1])], o_ref, what=f"o of sequence {n}")
    with pytest.raises(ValueError, match="sequence 1 of cu_seqlens has 7 tokens"):
        attn.reference(**packed, E=E, F=F, cu_seqlens=torch.tensor([0, 5, 12, 13]))


def test_gradcheck():
    torch.manual_seed(4)
    B, T, H, K, V, P, N = 1, 3, 1, 2, 2, 2, 4
    t = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V),
             E=randn(H, N, P), F=randn(H, N, P))
    assert gradcheck_spec("linformer", t)
