"""The chunked form's core: ``y_t = q_t @ S_t`` for ``S_t = exp(lam_t) S_{t-1} + outer(k_t, v_t)``
with a scalar log decay ``lam`` per token and head (or none), in chunks of ``C`` tokens.

Per chunk: intra-chunk scores through ``tl.dot`` with the causal decay mask
``exp(b_t - b_s)`` (``b`` the in-chunk cumulative log decay, in fp32), the previous chunks
through the state carried in registers, and the state passed on as
``exp(b_last) S + (k * exp(b_last - b))^T v``. Every exponent is <= 0, so decays down to 0
never overflow. One program per (sequence, head, V block) walks the chunks in order (the
backward in reverse, from the checkpointed chunk states).

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
def _bounds(cu_seqlens_ptr, chunk_offsets_ptr, i_n, T, C: tl.constexpr,
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
def chunk_fwd_kernel(
    q_ptr, k_ptr, v_ptr, lam_ptr, y_ptr, s0_ptr, sT_ptr, ckpt_ptr,
    cu_seqlens_ptr, chunk_offsets_ptr, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, DECAY: tl.constexpr, STRICT: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    SAVE_CHECKPOINTS: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr,
):
    """Grid (V blocks, sequences * heads). q, k [T*, H, K]; v, y [T*, H, V]; lam [T*, H]."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, ck_base = _bounds(cu_seqlens_ptr, chunk_offsets_ptr, i_n, T, C, IS_VARLEN)
    r_c = tl.arange(0, C)
    r_k = tl.arange(0, BK)
    r_v = i_v * BV + tl.arange(0, BV)
    m_k = r_k < K
    m_v = r_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = r_k[:, None] * V + r_v[None, :]
    if STRICT:
        causal = r_c[:, None] > r_c[None, :]
    else:
        causal = r_c[:, None] >= r_c[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        S += tl.load(s0_ptr + i_nh * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    for i_c in range(0, tl.cdiv(eos - bos, C)):
        t0 = bos + i_c * C
        m_t = t0 + r_c < eos
        rows = (t0 + r_c) * H + i_h
        q = tl.load(q_ptr + rows[:, None] * K + r_k[None, :], mask=m_t[:, None] & m_k[None, :],
                    other=0.0)
        k = tl.load(k_ptr + rows[:, None] * K + r_k[None, :], mask=m_t[:, None] & m_k[None, :],
                    other=0.0)
        v = tl.load(v_ptr + rows[:, None] * V + r_v[None, :], mask=m_t[:, None] & m_v[None, :],
                    other=0.0)
        if SAVE_CHECKPOINTS:
            tl.store(ckpt_ptr + ((ck_base + i_c) * H + i_h) * K * V + p_kv, S, mask=m_kv)
        # previous chunks, through the state
        y = _mm(q, S, DOT)
        A = _mm(q, tl.trans(k), DOT)
        if DECAY:
            lam = tl.load(lam_ptr + rows, mask=m_t, other=0.0).to(tl.float32)
            b = tl.cumsum(lam, axis=0)          # log decay from the chunk start, <= 0
            if STRICT:
                bq = b - lam
            else:
                bq = b
            b_last = tl.sum(lam, axis=0)
            y = y * tl.exp(bq)[:, None]
            A = A * tl.exp(tl.minimum(bq[:, None] - b[None, :], 0.0))
        A = tl.where(causal, A, 0.0)
        y += _mm(A, v, DOT)
        tl.store(y_ptr + rows[:, None] * V + r_v[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])
        if DECAY:
            k_dec = k.to(tl.float32) * tl.exp(b_last - b)[:, None]
            S = S * tl.exp(b_last) + _mm(tl.trans(k_dec), v, DOT)
        else:
            S += _mm(tl.trans(k), v, DOT)
    if STORE_FINAL_STATE:
        tl.store(sT_ptr + i_nh * K * V + p_kv, S.to(sT_ptr.dtype.element_ty), mask=m_kv)


@triton.jit
def chunk_bwd_kernel(
    q_ptr, k_ptr, v_ptr, lam_ptr, dy_ptr, ckpt_ptr, dsT_ptr,
    dq_ptr, dk_ptr, dv_ptr, dlam_ptr, ds0_ptr,
    cu_seqlens_ptr, chunk_offsets_ptr, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, DECAY: tl.constexpr, STRICT: tl.constexpr, NV: tl.constexpr,
    USE_FINAL_STATE_GRAD: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr,
):
    """Chunks last to first from the forward's checkpoints. dq, dk (and dlam) are sums over
    V blocks: added atomically (fp32 buffers zeroed by the caller) when NV > 1."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, ck_base = _bounds(cu_seqlens_ptr, chunk_offsets_ptr, i_n, T, C, IS_VARLEN)
    r_c = tl.arange(0, C)
    r_k = tl.arange(0, BK)
    r_v = i_v * BV + tl.arange(0, BV)
    m_k = r_k < K
    m_v = r_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = r_k[:, None] * V + r_v[None, :]
    if STRICT:
        causal = r_c[:, None] > r_c[None, :]
    else:
        causal = r_c[:, None] >= r_c[None, :]
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRAD:
        dS += tl.load(dsT_ptr + i_nh * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    n_chunks = tl.cdiv(eos - bos, C)
    for i_r in range(0, n_chunks):
        i_c = n_chunks - 1 - i_r
        t0 = bos + i_c * C
        m_t = t0 + r_c < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        rows = (t0 + r_c) * H + i_h
        q = tl.load(q_ptr + rows[:, None] * K + r_k[None, :], mask=m_tk, other=0.0)
        k = tl.load(k_ptr + rows[:, None] * K + r_k[None, :], mask=m_tk, other=0.0)
        v = tl.load(v_ptr + rows[:, None] * V + r_v[None, :], mask=m_tv, other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * V + r_v[None, :], mask=m_tv, other=0.0)
        S = tl.load(ckpt_ptr + ((ck_base + i_c) * H + i_h) * K * V + p_kv, mask=m_kv, other=0.0)
        A = _mm(q, tl.trans(k), DOT)
        dA = _mm(dy, tl.trans(v), DOT)
        dq = _mm(dy, tl.trans(S), DOT)        # previous chunks' part, before decay
        dk = _mm(v, tl.trans(dS), DOT)        # next chunks' part, before decay
        if DECAY:
            lam = tl.load(lam_ptr + rows, mask=m_t, other=0.0).to(tl.float32)
            b = tl.cumsum(lam, axis=0)
            if STRICT:
                bq = b - lam
            else:
                bq = b
            b_last = tl.sum(lam, axis=0)
            decay = tl.exp(tl.minimum(bq[:, None] - b[None, :], 0.0))
            A = A * decay
            dA = dA * decay
            dq = dq * tl.exp(bq)[:, None]
            k_dec = k.to(tl.float32) * tl.exp(b_last - b)[:, None]
            dk = dk * tl.exp(b_last - b)[:, None]
        else:
            k_dec = k.to(tl.float32)
        A = tl.where(causal, A, 0.0)
        dA = tl.where(causal, dA, 0.0)
        dq += _mm(dA, k, DOT)
        dk += _mm(tl.trans(dA), q, DOT)
        dv = _mm(tl.trans(A), dy, DOT) + _mm(k_dec, dS, DOT)
        if DECAY:
            # d/db: q-side q * dq, k-side -k * dk, and the chunk's total decay sees the
            # next state's sum(S' * dS'); lam_j enters every b_t with t >= j (t > j for bq
            # of a strict readout)
            S_next = S * tl.exp(b_last) + _mm(tl.trans(k_dec), v, DOT)
            last = tl.sum(tl.sum(S_next * dS, axis=1), axis=0)
            qdq = tl.sum(q.to(tl.float32) * dq, axis=1)
            kdk = tl.sum(k.to(tl.float32) * dk, axis=1)
            rq = tl.sum(qdq, axis=0) - tl.cumsum(qdq, axis=0)   # sum over t > j
            rk = tl.sum(kdk, axis=0) - tl.cumsum(kdk, axis=0) + kdk
            if STRICT:
                dlam = rq - rk + last
            else:
                dlam = rq + qdq - rk + last
            if NV == 1:
                tl.store(dlam_ptr + rows, dlam, mask=m_t)
            else:
                tl.atomic_add(dlam_ptr + rows, dlam, mask=m_t, sem="relaxed")
            dS = dS * tl.exp(b_last) + _mm(tl.trans(q.to(tl.float32) * tl.exp(bq)[:, None]),
                                           dy, DOT)
        else:
            dS += _mm(tl.trans(q), dy, DOT)
        if NV == 1:
            tl.store(dq_ptr + rows[:, None] * K + r_k[None, :],
                     dq.to(dq_ptr.dtype.element_ty), mask=m_tk)
            tl.store(dk_ptr + rows[:, None] * K + r_k[None, :],
                     dk.to(dk_ptr.dtype.element_ty), mask=m_tk)
        else:
            tl.atomic_add(dq_ptr + rows[:, None] * K + r_k[None, :], dq, mask=m_tk,
                          sem="relaxed")
            tl.atomic_add(dk_ptr + rows[:, None] * K + r_k[None, :], dk, mask=m_tk,
                          sem="relaxed")
        tl.store(dv_ptr + rows[:, None] * V + r_v[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=m_tv)
    tl.store(ds0_ptr + i_nh * K * V + p_kv, dS, mask=m_kv)
