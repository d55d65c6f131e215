"""The chunked form's core: ``y_t = q_t @ S_t`` for ``S_t = exp(lam_t) S_{t-1} + outer(k_t, v_t)``
in chunks of ``C`` tokens, with no decay (DECAY 0), a scalar log decay per token and head
(DECAY 1, ``lam [T*, H]``) or a diagonal one over K (DECAY 2, ``lam [T*, H, K]``).

Per chunk: intra-chunk scores with the causal decay mask ``exp(b_t - b_s)`` (``b`` the
in-chunk cumulative log decay, in fp32), the previous chunks through the state carried in
registers, and the state passed on as ``exp(b_last) S + (k * exp(b_last - b))^T v``. Every
exponent is <= 0, so decays down to 0 never overflow: scalar decays scale ``tl.dot`` scores;
diagonal decays differ per K channel, so their intra-chunk scores are built one query row at
a time with the row's own exponents.

Four kernels, as fla's chunked ops: ``chunk_states_kernel`` walks each sequence's chunks in
order (one program per sequence, head and V block) and stores the state at every chunk start;
``chunk_output_kernel`` then computes every chunk's outputs in parallel (one program per
chunk, head and V block). The backward mirrors it: ``chunk_dstates_kernel`` walks the chunks
in reverse storing the gradient of every chunk's end state, and ``chunk_grads_kernel``
computes every chunk's dq, dk, dv and decay gradients in parallel.

``codegen/chunk_op.py`` maps a spec onto this core (feature maps, gates and readouts
around it); ``STRICT`` makes the readout see the state before the token's own update
(RWKV-6 style), the rest of such readouts being elementwise.
"""

from __future__ import annotations

import triton
import triton.language as tl


#: operand precision of the kernels' dots (the constexpr DOT)
DOT_BF16, DOT_TF32, DOT_IEEE = 0, 1, 2


@triton.jit
def _mm(a, b, DOT: tl.constexpr):
    """a @ b with an fp32 accumulator; operands in bf16, tf32 or exact fp32 (ieee)."""
    if DOT == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    else:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))


@triton.jit
def _sequence(cu_seqlens_ptr, chunk_offsets_ptr, i_n, T, C: tl.constexpr,
            IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        bos = tl.load(cu_seqlens_ptr + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens_ptr + i_n + 1).to(tl.int64)
        ck_base = tl.load(chunk_offsets_ptr + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
        ck_base = i_n.to(tl.int64) * tl.cdiv(T, C)
    return bos, eos, ck_base


@triton.jit
def _lanes(i_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Lanes of K and of this program's V block, their masks, and a state block's offsets."""
    r_k = tl.arange(0, BK)
    r_v = i_v * BV + tl.arange(0, BV)
    m_k = r_k < K
    m_v = r_v < V
    return r_k, r_v, m_k, m_v, m_k[:, None] & m_v[None, :], r_k[:, None] * V + r_v[None, :]


@triton.jit
def _chunk(chunk_table_ptr, i_h, H: tl.constexpr, r_c):
    """Rows of a chunk's tokens for head ``i_h`` and their mask, from the chunk table
    (first token, end of its sequence)."""
    t0 = tl.load(chunk_table_ptr + 2 * tl.program_id(0))
    eos = tl.load(chunk_table_ptr + 2 * tl.program_id(0) + 1)
    return (t0 + r_c) * H + i_h, t0 + r_c < eos


@triton.jit
def _decays(lam_ptr, rows, m_t, r_k, m_k, K: tl.constexpr, DECAY: tl.constexpr,
            STRICT: tl.constexpr):
    """The chunk's cumulative log decays: b (keys), bq (queries; b - lam when STRICT) and
    b_last (the whole chunk); [C] or [C, BK] (padded rows and lanes decay by exp(0))."""
    if DECAY == 2:
        lam = tl.load(lam_ptr + rows[:, None] * K + r_k[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
    else:
        lam = tl.load(lam_ptr + rows, mask=m_t, other=0.0).to(tl.float32)
    b = tl.cumsum(lam, axis=0)
    if STRICT:
        bq = b - lam
    else:
        bq = b
    return b, bq, tl.sum(lam, axis=0)


@triton.jit
def _diag_scores(q, k, bq, b, dA, r_c, C: tl.constexpr, STRICT: tl.constexpr,
                 GRAD: tl.constexpr):
    """Intra-chunk scores under a diagonal decay, A[t, s] = sum_k q[t,k] k[s,k]
    exp(bq[t,k] - b[s,k]) for s <= t (s < t when STRICT), one row t at a time so that every
    exponent is <= 0; with GRAD also dq and dk of that part given dA[t, s] = dy_t . v_s."""
    qf = q.to(tl.float32)
    kf = k.to(tl.float32)
    A = tl.zeros([C, C], dtype=tl.float32)
    dq = tl.zeros(qf.shape, dtype=tl.float32)
    dk = tl.zeros(qf.shape, dtype=tl.float32)
    for t in range(0, C):
        row = (r_c == t)[:, None]
        q_t = tl.sum(tl.where(row, qf, 0.0), axis=0)
        bq_t = tl.sum(tl.where(row, bq, 0.0), axis=0)
        if STRICT:
            seen = r_c < t
        else:
            seen = r_c <= t
        e = tl.where(seen[:, None], tl.exp(tl.minimum(bq_t[None, :] - b, 0.0)), 0.0)
        ke = kf * e
        A = tl.where(row, tl.sum(ke * q_t[None, :], axis=1)[None, :], A)
        if GRAD:
            dA_t = tl.sum(tl.where(row, dA, 0.0), axis=0)
            dq = tl.where(row, tl.sum(dA_t[:, None] * ke, axis=0)[None, :], dq)
            dk += dA_t[:, None] * e * q_t[None, :]
    return A, dq, dk


@triton.jit
def _key_decay(k, lam_ptr, rows, m_t, r_k, m_k, K: tl.constexpr, DECAY: tl.constexpr,
               STRICT: tl.constexpr):
    """k * exp(b_last - b) (what a key adds to the chunk's end state) and exp(b_last)."""
    if DECAY == 2:
        b, _, b_last = _decays(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, STRICT)
        return k.to(tl.float32) * tl.exp(b_last[None, :] - b), tl.exp(b_last)[:, None]
    elif DECAY == 1:
        b, _, b_last = _decays(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, STRICT)
        return k.to(tl.float32) * tl.exp(b_last - b)[:, None], tl.exp(b_last)
    else:
        return k.to(tl.float32), 1.0


@triton.jit
def _query_decay(q, lam_ptr, rows, m_t, r_k, m_k, K: tl.constexpr, DECAY: tl.constexpr,
                 STRICT: tl.constexpr):
    """q * exp(bq) (how a query sees the chunk's start state) and exp(b_last)."""
    if DECAY == 2:
        _, bq, b_last = _decays(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, STRICT)
        return q.to(tl.float32) * tl.exp(bq), tl.exp(b_last)[:, None]
    elif DECAY == 1:
        _, bq, b_last = _decays(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, STRICT)
        return q.to(tl.float32) * tl.exp(bq)[:, None], tl.exp(b_last)
    else:
        return q.to(tl.float32), 1.0


@triton.jit
def chunk_states_kernel(
    k_ptr, v_ptr, lam_ptr, s0_ptr, sT_ptr, ckpt_ptr, cu_seqlens_ptr, chunk_offsets_ptr, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, DECAY: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT: tl.constexpr,
):
    """Grid (V blocks, sequences * heads): the state at every chunk start (ckpt) and after
    the last token (sT), in chunk order."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, ck_base = _sequence(cu_seqlens_ptr, chunk_offsets_ptr, i_n, T, C, IS_VARLEN)
    r_c = tl.arange(0, C)
    r_k, r_v, m_k, m_v, m_kv, p_kv = _lanes(i_v, K, V, BK, BV)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        S += tl.load(s0_ptr + i_nh * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    for i_c in range(0, tl.cdiv(eos - bos, C)):
        m_t = bos + i_c * C + r_c < eos
        rows = (bos + i_c * C + r_c) * H + i_h
        k = tl.load(k_ptr + rows[:, None] * K + r_k[None, :], mask=m_t[:, None] & m_k[None, :],
                    other=0.0)
        v = tl.load(v_ptr + rows[:, None] * V + r_v[None, :], mask=m_t[:, None] & m_v[None, :],
                    other=0.0)
        tl.store(ckpt_ptr + ((ck_base + i_c) * H + i_h) * K * V + p_kv, S, mask=m_kv)
        k_dec, decay_last = _key_decay(k, lam_ptr, rows, m_t, r_k, m_k, K, DECAY, False)
        S = S * decay_last + _mm(tl.trans(k_dec), v, DOT)
    tl.store(sT_ptr + i_nh * K * V + p_kv, S, mask=m_kv)


@triton.jit
def chunk_output_kernel(
    q_ptr, k_ptr, v_ptr, lam_ptr, y_ptr, ckpt_ptr, chunk_table_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, DECAY: tl.constexpr, STRICT: tl.constexpr, DOT: tl.constexpr,
):
    """Grid (chunks, V blocks, heads): y of one chunk from its start state and its tokens."""
    i_g, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r_c = tl.arange(0, C)
    r_k, r_v, m_k, m_v, m_kv, p_kv = _lanes(i_v, K, V, BK, BV)
    rows, m_t = _chunk(chunk_table_ptr, i_h, H, r_c)
    m_tk = m_t[:, None] & m_k[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    S = tl.load(ckpt_ptr + (i_g * H + i_h) * K * V + r_k[:, None] * V + r_v[None, :],
                mask=m_k[:, None] & m_v[None, :], other=0.0)
    q = tl.load(q_ptr + rows[:, None] * K + r_k[None, :], mask=m_tk, other=0.0)
    k = tl.load(k_ptr + rows[:, None] * K + r_k[None, :], mask=m_tk, other=0.0)
    v = tl.load(v_ptr + rows[:, None] * V + r_v[None, :], mask=m_tv, other=0.0)
    if STRICT:
        causal = r_c[:, None] > r_c[None, :]
    else:
        causal = r_c[:, None] >= r_c[None, :]
    if DECAY == 2:
        b, bq, _ = _decays(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, STRICT)
        y = _mm(q.to(tl.float32) * tl.exp(bq), S, DOT)    # earlier chunks, through S
        A, _, _ = _diag_scores(q, k, bq, b, b, r_c, C, STRICT, False)
    elif DECAY == 1:
        b, bq, _ = _decays(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, STRICT)
        y = _mm(q, S, DOT) * tl.exp(bq)[:, None]
        A = _mm(q, tl.trans(k), DOT) * tl.exp(tl.minimum(bq[:, None] - b[None, :], 0.0))
    else:
        y = _mm(q, S, DOT)
        A = _mm(q, tl.trans(k), DOT)
    y += _mm(tl.where(causal, A, 0.0), v, DOT)
    tl.store(y_ptr + rows[:, None] * V + r_v[None, :], y.to(y_ptr.dtype.element_ty), mask=m_tv)


@triton.jit
def chunk_dstates_kernel(
    q_ptr, lam_ptr, dy_ptr, dsT_ptr, ds0_ptr, dckpt_ptr, cu_seqlens_ptr, chunk_offsets_ptr, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, DECAY: tl.constexpr, STRICT: tl.constexpr,
    USE_FINAL_STATE_GRAD: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr,
):
    """Grid (V blocks, sequences * heads), chunks last to first: the gradient of every
    chunk's end state (dckpt) and of the initial state (ds0)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, ck_base = _sequence(cu_seqlens_ptr, chunk_offsets_ptr, i_n, T, C, IS_VARLEN)
    r_c = tl.arange(0, C)
    r_k, r_v, m_k, m_v, m_kv, p_kv = _lanes(i_v, K, V, BK, BV)
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRAD:
        dS += tl.load(dsT_ptr + i_nh * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    n_chunks = tl.cdiv(eos - bos, C)
    for i_r in range(0, n_chunks):
        i_c = n_chunks - 1 - i_r
        m_t = bos + i_c * C + r_c < eos
        rows = (bos + i_c * C + r_c) * H + i_h
        tl.store(dckpt_ptr + ((ck_base + i_c) * H + i_h) * K * V + p_kv, dS, mask=m_kv)
        q = tl.load(q_ptr + rows[:, None] * K + r_k[None, :], mask=m_t[:, None] & m_k[None, :],
                    other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * V + r_v[None, :],
                     mask=m_t[:, None] & m_v[None, :], other=0.0)
        q_dec, decay_last = _query_decay(q, lam_ptr, rows, m_t, r_k, m_k, K, DECAY, STRICT)
        dS = dS * decay_last + _mm(tl.trans(q_dec), dy, DOT)
    tl.store(ds0_ptr + i_nh * K * V + p_kv, dS, mask=m_kv)


@triton.jit
def chunk_grads_kernel(
    q_ptr, k_ptr, v_ptr, lam_ptr, dy_ptr, ckpt_ptr, dckpt_ptr, chunk_table_ptr,
    dq_ptr, dk_ptr, dv_ptr, dlam_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, DECAY: tl.constexpr, STRICT: tl.constexpr, NV: tl.constexpr,
    DOT: tl.constexpr,
):
    """Grid (chunks, V blocks, heads): dq, dk, dv and dlam of one chunk from its start state
    and the gradient of its end state. dq, dk and dlam are sums over V blocks: added
    atomically (fp32 buffers zeroed by the caller) when NV > 1."""
    i_g, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r_c = tl.arange(0, C)
    r_k, r_v, m_k, m_v, m_kv, p_kv = _lanes(i_v, K, V, BK, BV)
    rows, m_t = _chunk(chunk_table_ptr, i_h, H, r_c)
    m_tk = m_t[:, None] & m_k[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    p_state = (i_g * H + i_h) * K * V + p_kv
    S = tl.load(ckpt_ptr + p_state, mask=m_kv, other=0.0)
    dS = tl.load(dckpt_ptr + p_state, mask=m_kv, other=0.0)
    q = tl.load(q_ptr + rows[:, None] * K + r_k[None, :], mask=m_tk, other=0.0)
    k = tl.load(k_ptr + rows[:, None] * K + r_k[None, :], mask=m_tk, other=0.0)
    v = tl.load(v_ptr + rows[:, None] * V + r_v[None, :], mask=m_tv, other=0.0)
    dy = tl.load(dy_ptr + rows[:, None] * V + r_v[None, :], mask=m_tv, other=0.0)
    if STRICT:
        causal = r_c[:, None] > r_c[None, :]
    else:
        causal = r_c[:, None] >= r_c[None, :]
    dA = tl.where(causal, _mm(dy, tl.trans(v), DOT), 0.0)   # d score[t, s] = dy_t . v_s
    qf = q.to(tl.float32)
    kf = k.to(tl.float32)
    if DECAY == 2:
        b, bq, b_last = _decays(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, STRICT)
        A, dq, dk = _diag_scores(q, k, bq, b, dA, r_c, C, STRICT, True)
        dq += _mm(dy, tl.trans(S), DOT) * tl.exp(bq)
        k_decay = tl.exp(b_last[None, :] - b)
        dk += _mm(v, tl.trans(dS), DOT) * k_decay
        decay_last = tl.exp(b_last)[:, None]
    elif DECAY == 1:
        b, bq, b_last = _decays(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, STRICT)
        decay = tl.exp(tl.minimum(bq[:, None] - b[None, :], 0.0))
        A = _mm(q, tl.trans(k), DOT) * decay
        dA = dA * decay
        k_decay = tl.exp(b_last - b)[:, None]
        dq = _mm(dy, tl.trans(S), DOT) * tl.exp(bq)[:, None] + _mm(dA, k, DOT)
        dk = _mm(v, tl.trans(dS), DOT) * k_decay + _mm(tl.trans(dA), q, DOT)
        decay_last = tl.exp(b_last)
    else:
        A = _mm(q, tl.trans(k), DOT)
        dq = _mm(dy, tl.trans(S), DOT) + _mm(dA, k, DOT)
        dk = _mm(v, tl.trans(dS), DOT) + _mm(tl.trans(dA), q, DOT)
        k_decay = 1.0
        decay_last = 1.0
    k_dec = kf * k_decay
    dv = _mm(tl.trans(tl.where(causal, A, 0.0)), dy, DOT) + _mm(k_dec, dS, DOT)
    if DECAY > 0:
        # d/db: the query side gives q * dq, the key side -k * dk, and the chunk's total
        # decay sees sum(S_next * dS); lam_j enters every b_t with t >= j (and bq_t with
        # t > j for a strict readout)
        S_next = S * decay_last + _mm(tl.trans(k_dec), v, DOT)
        if DECAY == 2:
            last = tl.sum(S_next * dS, axis=1)[None, :]
            qdq = qf * dq
            kdk = kf * dk
        else:
            last = tl.sum(tl.sum(S_next * dS, axis=1), axis=0)
            qdq = tl.sum(qf * dq, axis=1)
            kdk = tl.sum(kf * dk, axis=1)
        later_q = tl.sum(qdq, axis=0) - tl.cumsum(qdq, axis=0)  # over t > j
        from_k = tl.sum(kdk, axis=0) - tl.cumsum(kdk, axis=0) + kdk  # over t >= j
        if STRICT:
            dlam = later_q - from_k + last
        else:
            dlam = later_q + qdq - from_k + last
        if DECAY == 2:
            p_lam = dlam_ptr + rows[:, None] * K + r_k[None, :]
            m_lam = m_tk
        else:
            p_lam = dlam_ptr + rows
            m_lam = m_t
        if NV == 1:
            tl.store(p_lam, dlam, mask=m_lam)
        else:
            tl.atomic_add(p_lam, dlam, mask=m_lam, sem="relaxed")
    if NV == 1:
        tl.store(dq_ptr + rows[:, None] * K + r_k[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=m_tk)
        tl.store(dk_ptr + rows[:, None] * K + r_k[None, :], dk.to(dk_ptr.dtype.element_ty),
                 mask=m_tk)
    else:
        tl.atomic_add(dq_ptr + rows[:, None] * K + r_k[None, :], dq, mask=m_tk, sem="relaxed")
        tl.atomic_add(dk_ptr + rows[:, None] * K + r_k[None, :], dk, mask=m_tk, sem="relaxed")
    tl.store(dv_ptr + rows[:, None] * V + r_v[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=m_tv)


@triton.jit
def delta_chunk_fwd_kernel(
    q_ptr, k_ptr, v_ptr, beta_ptr, lam_ptr, y_ptr, s0_ptr, sT_ptr, cu_seqlens_ptr, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, DECAY: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr,
):
    """Delta rule S_t = exp(lam_t) (S - beta_t k_t k_t^T S) + beta_t k_t v_t^T, chunk by chunk
    (grid: V blocks, sequences * heads). Within a chunk the updates u_t = beta_t (v_t -
    S_{t-1}^T k_t) solve (I + A) U = beta * (V - exp(b) K S) with A[t, s] = beta_t k_t.k_s
    exp(b_t - b_s) (s < t), a unit lower-triangular system solved by forward substitution
    in fp32 (the WY form: U = U0 - W S with W, U0 = (I + A)^-1 [beta exp(b) K, beta V])."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, _ = _sequence(cu_seqlens_ptr, cu_seqlens_ptr, i_n, T, C, IS_VARLEN)
    r_c = tl.arange(0, C)
    r_k, r_v, m_k, m_v, m_kv, p_kv = _lanes(i_v, K, V, BK, BV)
    earlier = r_c[:, None] > r_c[None, :]
    causal = r_c[:, None] >= r_c[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        S += tl.load(s0_ptr + i_nh * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    for i_c in range(0, tl.cdiv(eos - bos, C)):
        m_t = bos + i_c * C + r_c < eos
        rows = (bos + i_c * C + r_c) * H + i_h
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        q = tl.load(q_ptr + rows[:, None] * K + r_k[None, :], mask=m_tk, other=0.0)
        k = tl.load(k_ptr + rows[:, None] * K + r_k[None, :], mask=m_tk, other=0.0)
        v = tl.load(v_ptr + rows[:, None] * V + r_v[None, :], mask=m_tv, other=0.0)
        beta = tl.load(beta_ptr + rows, mask=m_t, other=0.0).to(tl.float32)
        kf = k.to(tl.float32)
        if DECAY == 1:
            b, _, b_last = _decays(lam_ptr, rows, m_t, r_k, m_k, K, 1, False)
            pair = tl.exp(tl.minimum(b[:, None] - b[None, :], 0.0))
            Wb = kf * (beta * tl.exp(b))[:, None]
            q_dec = q.to(tl.float32) * tl.exp(b)[:, None]
            k_dec = kf * tl.exp(b_last - b)[:, None]
            decay_last = tl.exp(b_last)
        else:
            pair = tl.full([C, C], 1.0, tl.float32)
            Wb = kf * beta[:, None]
            q_dec = q.to(tl.float32)
            k_dec = kf
            decay_last = 1.0
        A = tl.where(earlier, _mm(k, tl.trans(k), DOT) * pair * beta[:, None], 0.0)
        W = Wb
        U = v.to(tl.float32) * beta[:, None]
        for t in range(1, C):  # forward substitution, row t from the rows before it
            row = (r_c == t)[:, None]
            a_t = tl.sum(tl.where(row, A, 0.0), axis=0)
            W = tl.where(row, W - tl.sum(a_t[:, None] * W, axis=0)[None, :], W)
            U = tl.where(row, U - tl.sum(a_t[:, None] * U, axis=0)[None, :], U)
        U = U - _mm(W, S, DOT)      # the chunk's updates u_t, now that S is known
        scores = tl.where(causal, _mm(q, tl.trans(k), DOT) * pair, 0.0)
        y = _mm(q_dec, S, DOT) + _mm(scores, U, DOT)
        tl.store(y_ptr + rows[:, None] * V + r_v[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=m_tv)
        S = S * decay_last + _mm(tl.trans(k_dec), U, DOT)
    if STORE_FINAL_STATE:
        tl.store(sT_ptr + i_nh * K * V + p_kv, S.to(sT_ptr.dtype.element_ty), mask=m_kv)
