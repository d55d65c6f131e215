"""The chunked form's core: ``y_t = q_t @ S_t`` for ``S_t = exp(lam_t) S_{t-1} + outer(k_t, v_t)``
in chunks of ``C`` tokens, with no decay (DECAY 0), a scalar log decay per token and head
(DECAY 1, ``lam [T*, H]``) or a diagonal one over K (DECAY 2, ``lam [T*, H, K]``, which
the kernels read as its in-chunk cumulative sums from ``chunk_cumsum_kernel``).

Per chunk: intra-chunk scores with the causal decay mask ``exp(b_t - b_s)`` (``b`` the
in-chunk cumulative log decay, in fp32), the previous chunks through the state, and the state
passed on as ``exp(b_last) S + (k * exp(b_last - b))^T v``. Every exponent is <= 0, so decays
down to 0 never overflow: scalar decays scale ``tl.dot`` scores; diagonal decays differ per K
channel, so their scores go by sub-chunks of SUB tokens: pairs in different sub-chunks
through one dot with both sides decayed against a reference point between them, pairs within
a sub-chunk one query row at a time. K and V are cut into tiles of BK and BV lanes.

Four kernels, as fla's chunked ops: ``chunk_states_kernel`` walks each sequence's chunks in
order (one program per sequence, head and V block) and stores the state at every chunk start;
``chunk_output_kernel`` then computes every chunk's outputs in parallel (one program per
chunk, head and V block). The backward mirrors it: ``chunk_dstates_kernel`` walks the chunks
in reverse storing the gradient of every chunk's end state, and ``chunk_grads_kernel``
computes every chunk's dq, dk, dv and decay gradients in parallel.

The same four kernels carry the other structures through constexpr modes. NORM: a
normalizer z (a column of ones as its value) rides along with S. DELTA: the delta rule, whose
values are each chunk's updates u = U0 - W S, made from its WY form by ``delta_wy_kernel``
(every chunk at once) and taken back through by ``delta_wy_bwd_kernel``. LOW_RANK / SECOND:
the diagonal-plus-low-rank transition (RWKV-7), with its own two parallel backward kernels.

``codegen/chunk_op.py`` maps a spec onto this core (feature maps, gates and readouts
around it); ``STRICT`` makes the readout see the state before the token's own update
(RWKV-6 style), the rest of such readouts being elementwise.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import interpreting


#: the most K tiles (whose loop bodies hold a loop over V) and V tiles a kernel's loop over
#: them is unrolled for: K = V = 128 at the GPU's tiles (64 lanes, 32 in the delta kernels'
#: V); wider heads run a loop, which compiles once (its body a ``_..._of_k_block`` or
#: ``_..._of_v_block`` helper): gla's gradient kernel at K = V = 256 compiles in 1.6 s
#: instead of 12 (sm_90, Triton 3.6)
MAX_UNROLLED_K = tl.constexpr(2)
MAX_UNROLLED_V = tl.constexpr(4)

#: operand precision of the kernels' dots (the constexpr DOT); TF32X3 splits each fp32
#: operand into a tf32 high and low part (three tensor-core dots, about fp32's accuracy)
DOT_BF16, DOT_TF32, DOT_IEEE, DOT_TF32X3 = 0, 1, 2, 3


#: Triton's interpreter runs the kernels (decided when triton is imported, as here): it gets
#: bf16 dots wrong (errors of 1e10) and computes tf32 ones in fp32, so ``_mm`` rounds the
#: operands as the GPU's tensor cores do and multiplies them in fp32, which is what a GPU's
#: bf16 and tf32 dots compute (their products are exact in fp32)
_INTERPRETED = tl.constexpr(interpreting())


@triton.jit
def _tf32(x):
    """x rounded to tf32 (10 mantissa bits, to nearest), as an fp32 tensor."""
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)


@triton.jit
def _mm(a, b, DOT: tl.constexpr):
    """a @ b with an fp32 accumulator; operands in bf16, tf32, tf32x3 or exact fp32 (ieee).
    Under the interpreter, bf16 and tf32 operands are rounded and multiplied in fp32."""
    if DOT == 3:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    elif DOT == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT == 1:
        if _INTERPRETED:
            return tl.dot(_tf32(a), _tf32(b), input_precision="ieee")
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    else:
        if _INTERPRETED:
            return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32),
                          input_precision="ieee")
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))


@triton.jit
def _mm_of_loaded(a, b, DOT: tl.constexpr):
    """``_mm`` for operands as loaded from memory: two bf16 tiles take bf16 operands whatever
    ``DOT``, since tf32 or fp32 operands would hold the same values (the products of bf16
    numbers are exact in fp32) at two to four times the tensor cores' time."""
    if a.dtype == tl.bfloat16 and b.dtype == tl.bfloat16:
        return _mm(a, b, 0)
    return _mm(a, b, DOT)


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
def _chunk(chunk_table_ptr, i_h, H: tl.constexpr, r_c):
    """Rows of a chunk's tokens for head ``i_h`` and their mask, from the chunk table
    (first token, end of its sequence, start of its sequence)."""
    t0, eos, _ = _span(chunk_table_ptr)
    return (t0 + r_c) * H + i_h, t0 + r_c < eos


@triton.jit
def _span(chunk_table_ptr):
    """This program's chunk table row: the chunk's first token, the end and the start of
    its sequence."""
    row = chunk_table_ptr + 3 * tl.program_id(0)
    return tl.load(row), tl.load(row + 1), tl.load(row + 2)


@triton.jit
def _pair_decay(lam_ptr, rows_q, m_q, rows_k, m_kr, gap, DECAY: tl.constexpr,
                STRICT: tl.constexpr):
    """Parallel form, scalar decays: exp(bq_t - b_s) for queries of one block and keys of
    an earlier block, as (bq_t from the query block's start) + gap (the blocks between) +
    (b at the key block's end - b_s), each part <= 0; 1 without decay."""
    if DECAY == 1:
        _, bq, _ = _decays(lam_ptr, rows_q, m_q, rows_q, m_q, 1, DECAY, STRICT)
        b, _, b_end = _decays(lam_ptr, rows_k, m_kr, rows_k, m_kr, 1, DECAY, False)
        return tl.exp(bq[:, None] + gap + (b_end - b)[None, :])
    else:
        return 1.0


@triton.jit
def _decays(lam_ptr, rows, m_t, r_k, m_k, K: tl.constexpr, DECAY: tl.constexpr,
            STRICT: tl.constexpr, H: tl.constexpr = 1):
    """The chunk's cumulative log decays: b (keys), bq (queries; the row before's b when
    STRICT) and b_last (the whole chunk); [C] or [C, BK]. Scalar decays sum ``lam_ptr``'s
    [C] log decays here (padded rows decay by exp(0)). Diagonal decays read them from the
    in-chunk cumulative sums that ``lam_ptr`` holds then (``chunk_cumsum_kernel``, run
    once per call): no scan of a [C, BK] tile per use (8 per chunk in the gradient kernel).
    Their padded rows and lanes read b = 0; every caller multiplies those rows by zeros."""
    if DECAY == 2:
        m = m_t[:, None] & m_k[None, :]
        p = lam_ptr + rows[:, None] * K + r_k[None, :]
        b = tl.load(p, mask=m, other=0.0)
        if STRICT:      # the row before, H rows back (0 before the chunk's first row)
            later = (tl.arange(0, rows.shape[0]) > 0)[:, None]
            bq = tl.load(p - H * K, mask=m & later, other=0.0)
        else:
            bq = b
        b_last = _at_last(b, rows, m_t)
    else:
        lam = tl.load(lam_ptr + rows, mask=m_t, other=0.0).to(tl.float32)
        b = tl.cumsum(lam, axis=0)
        if STRICT:
            bq = b - lam
        else:
            bq = b
        b_last = tl.sum(lam, axis=0)
    return b, bq, b_last


@triton.jit
def _pair_product(a_ptr, b_ptr, rows_a, m_a, rows_b, m_b, W: tl.constexpr, BW: tl.constexpr,
                  NW: tl.constexpr, DOT: tl.constexpr):
    """[C, C] products a_t . b_s of two blocks' rows of [T*, H, W] tensors, over W tiles."""
    C: tl.constexpr = rows_a.shape[0]
    P = tl.zeros([C, C], dtype=tl.float32)
    for i_w in tl.static_range(NW):
        r_w, m_w = _block(i_w, BW, W)
        P += _mm(_rows_of(a_ptr, rows_a, m_a, r_w, m_w, W),
                 tl.trans(_rows_of(b_ptr, rows_b, m_b, r_w, m_w, W)), DOT)
    return P


@triton.jit
def _block_rows(start, r_c, eos, i_h, H: tl.constexpr):
    """Rows (for head ``i_h``) and mask of the block of tokens from ``start``."""
    return (start + r_c) * H + i_h, start + r_c < eos


@triton.jit
def _gap_after(lam_ptr, rows, m_t, gap, DECAY: tl.constexpr):
    """``gap`` plus the scalar log decay of a whole block (unchanged without decay)."""
    if DECAY == 1:
        gap += tl.sum(tl.load(lam_ptr + rows, mask=m_t, other=0.0).to(tl.float32), axis=0)
    return gap


@triton.jit
def _cross_block_grads(q_ptr, k_ptr, v_ptr, lam_ptr, dy_ptr, chunk_table_ptr, pairs_ptr, q,
                       rows, m_t, r_c, r_k, m_k, i_k, i_h, NB, H: tl.constexpr,
                       K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
                       NV: tl.constexpr, DECAY: tl.constexpr, STRICT: tl.constexpr,
                       DOT: tl.constexpr, DLAM: tl.constexpr):
    """Parallel form: the parts of this block's dq from keys of earlier blocks and of its dk
    from queries of later blocks (same sequence), on K lanes ``r_k``, pair by pair.
    Diagonal decays: per lane, the query side decayed from its block's start, the key side
    to its block's end and the blocks between by the product of their decays (each factor
    <= 1). Scalar decays: also stores, for every earlier block J, this K block's part of
    the sum over the block pair of d loss / d (b_t - b_s) = q_t . (dA[t, s] k_s) (``q``, this
    block's queries on the K lanes) at ``pairs_ptr`` [chunks, H, NK, NB] (J by its index in
    the sequence), from which the host sums the pairs that cross each block's end."""
    t0, eos, bos = _span(chunk_table_ptr)
    C: tl.constexpr = r_c.shape[0]
    dq = tl.zeros([C, r_k.shape[0]], dtype=tl.float32)
    dk = tl.zeros([C, r_k.shape[0]], dtype=tl.float32)
    if DECAY == 2:
        between = tl.full([r_k.shape[0]], 1.0, tl.float32)
        for jj in range(0, (t0 - bos) // C):      # earlier blocks, nearest first
            rows_j, m_j = _block_rows(t0 - (jj + 1) * C, r_c, eos, i_h, H)
            dA = _pair_product(dy_ptr, v_ptr, rows, m_t, rows_j, m_j, V, BV, NV, DOT)
            k_j, last_j = _key_decay(_rows_of(k_ptr, rows_j, m_j, r_k, m_k, K), lam_ptr,
                                     rows_j, m_j, r_k, m_k, K, DECAY, False, H)
            dq += _mm(dA, k_j * between[None, :], DOT)
            between = between * _lane_decay(last_j, DECAY)
        q_factor, _ = _query_factor(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, STRICT, H)
        between = tl.full([r_k.shape[0]], 1.0, tl.float32)
        for l0 in range(t0 + C, eos, C):          # later blocks, nearest first
            rows_l, m_l = _block_rows(l0, r_c, eos, i_h, H)
            dA = _pair_product(dy_ptr, v_ptr, rows_l, m_l, rows, m_t, V, BV, NV, DOT)
            q_l, last_l = _query_decay(_rows_of(q_ptr, rows_l, m_l, r_k, m_k, K), lam_ptr,
                                       rows_l, m_l, r_k, m_k, K, DECAY, STRICT, H)
            dk += _mm(tl.trans(dA), q_l * between[None, :], DOT)
            between = between * _lane_decay(last_l, DECAY)
        k_factor, _ = _key_factor(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, H)
        return dq * q_factor, dk * k_factor
    gap = tl.sum(tl.zeros([1], dtype=tl.float32), axis=0)
    p_pairs = ((tl.program_id(0).to(tl.int64) * H + i_h) * NK + i_k) * NB + (t0 - bos) // C - 1
    for jj in range(0, (t0 - bos) // C):          # earlier blocks, nearest first
        rows_j, m_j = _block_rows(t0 - (jj + 1) * C, r_c, eos, i_h, H)
        dA = (_pair_product(dy_ptr, v_ptr, rows, m_t, rows_j, m_j, V, BV, NV, DOT)
              * _pair_decay(lam_ptr, rows, m_t, rows_j, m_j, gap, DECAY, STRICT))
        dq_j = _mm(dA, _rows_of(k_ptr, rows_j, m_j, r_k, m_k, K), DOT)
        dq += dq_j
        if DECAY == 1 and DLAM:
            tl.store(pairs_ptr + p_pairs - jj, tl.sum(tl.sum(q * dq_j, axis=1), axis=0))
        gap = _gap_after(lam_ptr, rows_j, m_j, gap, DECAY)
    gap = tl.sum(tl.zeros([1], dtype=tl.float32), axis=0)
    for l0 in range(t0 + C, eos, C):              # later blocks, nearest first
        rows_l, m_l = _block_rows(l0, r_c, eos, i_h, H)
        dA = (_pair_product(dy_ptr, v_ptr, rows_l, m_l, rows, m_t, V, BV, NV, DOT)
              * _pair_decay(lam_ptr, rows_l, m_l, rows, m_t, gap, DECAY, STRICT))
        dk += _mm(tl.trans(dA), _rows_of(q_ptr, rows_l, m_l, r_k, m_k, K), DOT)
        gap = _gap_after(lam_ptr, rows_l, m_l, gap, DECAY)
    return dq, dk


@triton.jit
def _cross_blocks_by_lane(q_ptr, k_ptr, w_ptr, lam_ptr, chunk_table_ptr, rows, m_t, r_c, r_w,
                          m_w, i_h, H: tl.constexpr, K: tl.constexpr, W: tl.constexpr,
                          BK: tl.constexpr, NK: tl.constexpr, STRICT: tl.constexpr,
                          DOT: tl.constexpr, LATER: tl.constexpr):
    """Parallel form, diagonal decays: sum over the earlier blocks of this block's sequence
    of (this block's queries . their keys, decayed per lane) @ their rows of ``w`` (the
    values: this block's y), or with LATER over the later blocks of (this block's keys .
    their queries) @ their rows of ``w`` (dy: this block's dv). By K tiles: the query side
    decayed from its block's start, the key side to its block's end, the blocks between by
    the product of their totals (every factor <= 1)."""
    t0, eos, bos = _span(chunk_table_ptr)
    C: tl.constexpr = r_c.shape[0]
    out = tl.zeros([C, r_w.shape[0]], dtype=tl.float32)
    n_other = (eos - t0 - 1) // C if LATER else (t0 - bos) // C
    for i_k in tl.static_range(NK):
        r_k, m_k = _block(i_k, BK, K)
        if LATER:
            mine, _ = _key_decay(_rows_of(k_ptr, rows, m_t, r_k, m_k, K), lam_ptr, rows, m_t,
                                 r_k, m_k, K, 2, False, H)
        else:
            mine, _ = _query_decay(_rows_of(q_ptr, rows, m_t, r_k, m_k, K), lam_ptr, rows,
                                   m_t, r_k, m_k, K, 2, STRICT, H)
        between = tl.full([BK], 1.0, tl.float32)
        for jj in range(0, n_other):              # nearest first
            rows_o, m_o = _block_rows(t0 + (jj + 1) * C if LATER else t0 - (jj + 1) * C,
                                      r_c, eos, i_h, H)
            if LATER:
                theirs, last = _query_decay(_rows_of(q_ptr, rows_o, m_o, r_k, m_k, K),
                                            lam_ptr, rows_o, m_o, r_k, m_k, K, 2, STRICT, H)
            else:
                theirs, last = _key_decay(_rows_of(k_ptr, rows_o, m_o, r_k, m_k, K), lam_ptr,
                                          rows_o, m_o, r_k, m_k, K, 2, False, H)
            pairs = _mm(mine, tl.trans(theirs * between[None, :]), DOT)
            out += _mm(pairs, _rows_of(w_ptr, rows_o, m_o, r_w, m_w, W), DOT)
            between = between * _lane_decay(last, 2)
    return out


@triton.jit
def _cross_block_output(q_ptr, k_ptr, v_ptr, lam_ptr, chunk_table_ptr, rows, m_t, r_c, r_v,
                        m_v, i_h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                        BK: tl.constexpr, NK: tl.constexpr, DECAY: tl.constexpr,
                        STRICT: tl.constexpr, DOT: tl.constexpr):
    """Parallel form: this block's y on V lanes ``r_v`` from the keys and values of the
    earlier blocks of its sequence (what the chunked form reads from the state). Diagonal
    decays: by K tiles, each pair's scores made from the decayed rows (``_cross_block_grads``)."""
    t0, eos, bos = _span(chunk_table_ptr)
    C: tl.constexpr = r_c.shape[0]
    y = tl.zeros([C, r_v.shape[0]], dtype=tl.float32)
    if DECAY == 2:
        return _cross_blocks_by_lane(q_ptr, k_ptr, v_ptr, lam_ptr, chunk_table_ptr, rows, m_t,
                                     r_c, r_v, m_v, i_h, H, K, V, BK, NK, STRICT, DOT, False)
    gap = tl.sum(tl.zeros([1], dtype=tl.float32), axis=0)
    for jj in range(0, (t0 - bos) // C):          # earlier blocks, nearest first
        rows_j, m_j = _block_rows(t0 - (jj + 1) * C, r_c, eos, i_h, H)
        A = (_pair_product(q_ptr, k_ptr, rows, m_t, rows_j, m_j, K, BK, NK, DOT)
             * _pair_decay(lam_ptr, rows, m_t, rows_j, m_j, gap, DECAY, STRICT))
        y += _mm(A, _rows_of(v_ptr, rows_j, m_j, r_v, m_v, V), DOT)
        gap = _gap_after(lam_ptr, rows_j, m_j, gap, DECAY)
    return y


@triton.jit
def _later_blocks_dv(q_ptr, k_ptr, lam_ptr, dy_ptr, chunk_table_ptr, rows, m_t, r_c, r_v, m_v,
                     i_h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                     NK: tl.constexpr, DECAY: tl.constexpr, STRICT: tl.constexpr,
                     DOT: tl.constexpr):
    """Parallel form: the part of this block's dv from queries of later blocks (V lanes
    ``r_v``): the scores of later queries on this block's keys, transposed, times their dy
    (diagonal decays: by K tiles, as ``_cross_block_output``)."""
    t0, eos, bos = _span(chunk_table_ptr)
    C: tl.constexpr = r_c.shape[0]
    dv = tl.zeros([C, r_v.shape[0]], dtype=tl.float32)
    if DECAY == 2:
        return _cross_blocks_by_lane(q_ptr, k_ptr, dy_ptr, lam_ptr, chunk_table_ptr, rows, m_t,
                                     r_c, r_v, m_v, i_h, H, K, V, BK, NK, STRICT, DOT, True)
    gap = tl.sum(tl.zeros([1], dtype=tl.float32), axis=0)
    for l0 in range(t0 + C, eos, C):              # later blocks, nearest first
        rows_l, m_l = _block_rows(l0, r_c, eos, i_h, H)
        A = (_pair_product(q_ptr, k_ptr, rows_l, m_l, rows, m_t, K, BK, NK, DOT)
             * _pair_decay(lam_ptr, rows_l, m_l, rows, m_t, gap, DECAY, STRICT))
        dv += _mm(tl.trans(A), _rows_of(dy_ptr, rows_l, m_l, r_v, m_v, V), DOT)
        gap = _gap_after(lam_ptr, rows_l, m_l, gap, DECAY)
    return dv


@triton.jit
def _key_factor(lam_ptr, rows, m_t, r_k, m_k, K: tl.constexpr, DECAY: tl.constexpr,
                H: tl.constexpr):
    """exp(b_last - b), what decays a key's term to the chunk's end ([C, BK], [C, 1] or 1),
    and exp(b_last), the decay of the whole chunk ([BK, 1], scalar or 1)."""
    if DECAY == 2:
        b, _, b_last = _decays(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, False, H)
        return tl.exp(b_last[None, :] - b), tl.exp(b_last)[:, None]
    elif DECAY == 1:
        b, _, b_last = _decays(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, False)
        return tl.exp(b_last - b)[:, None], tl.exp(b_last)
    else:
        return 1.0, 1.0


@triton.jit
def _scalar_factors(lam_ptr, rows, m_t, STRICT: tl.constexpr):
    """A scalar decay's ``_key_factor`` and ``_query_factor`` from one scan: exp(b_last - b)
    and exp(bq) ([C, 1] each) and exp(b_last)."""
    b, bq, b_last = _decays(lam_ptr, rows, m_t, 0, 0, K=1, DECAY=1, STRICT=STRICT)
    return tl.exp(b_last - b)[:, None], tl.exp(bq)[:, None], tl.exp(b_last)


@triton.jit
def _query_factor(lam_ptr, rows, m_t, r_k, m_k, K: tl.constexpr, DECAY: tl.constexpr,
                  STRICT: tl.constexpr, H: tl.constexpr):
    """exp(bq), how a query sees the chunk's start state ([C, BK], [C, 1] or 1), and
    exp(b_last)."""
    if DECAY == 2:
        _, bq, b_last = _decays(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, STRICT, H)
        return tl.exp(bq), tl.exp(b_last)[:, None]
    elif DECAY == 1:
        _, bq, b_last = _decays(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, STRICT)
        return tl.exp(bq)[:, None], tl.exp(b_last)
    else:
        return 1.0, 1.0


@triton.jit
def _key_decay(k, lam_ptr, rows, m_t, r_k, m_k, K: tl.constexpr, DECAY: tl.constexpr,
               STRICT: tl.constexpr, H: tl.constexpr):
    """k * exp(b_last - b) (what a key adds to the chunk's end state) and exp(b_last)."""
    factor, decay_last = _key_factor(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, H)
    return k.to(tl.float32) * factor, decay_last


@triton.jit
def _decayed_t_mm(x, factor, y, DECAY: tl.constexpr, DOT: tl.constexpr):
    """(x * factor)^T @ y for a per-token factor ([C, 1], or 1) or a per-lane one ([C, BK],
    DECAY 2). A per-token factor scales y's rows instead: y is the narrower tile ([C, BV]
    against [C, K]), and x goes to the dot as it was loaded (no register re-layout of it)."""
    if DECAY == 2:
        return _mm(tl.trans(x.to(tl.float32) * factor), y, DOT)
    elif DECAY == 1:
        return _mm(tl.trans(x), y * factor, DOT)
    else:   # (no factor: the interpreter gets a half tensor times a Python float wrong)
        return _mm(tl.trans(x), y, DOT)


@triton.jit
def _decayed_mm(x, factor, y, DECAY: tl.constexpr, DOT: tl.constexpr):
    """(x * factor) @ y, as ``_decayed_t_mm``: a per-token factor scales the product's rows."""
    if DECAY == 2:
        return _mm(x.to(tl.float32) * factor, y, DOT)
    elif DECAY == 1:
        return _mm(x, y, DOT) * factor
    else:
        return _mm(x, y, DOT)


@triton.jit
def _lane_decay(decay_last, DECAY: tl.constexpr):
    """A chunk's total decay per K lane ([BK]) from ``_key_factor``'s [BK, 1] (diagonal
    decays), or as it is (a scalar, or 1)."""
    if DECAY == 2:
        return tl.sum(decay_last, axis=1)
    else:
        return decay_last


@triton.jit
def _query_decay(q, lam_ptr, rows, m_t, r_k, m_k, K: tl.constexpr, DECAY: tl.constexpr,
                 STRICT: tl.constexpr, H: tl.constexpr):
    """q * exp(bq) (how a query sees the chunk's start state) and exp(b_last)."""
    factor, decay_last = _query_factor(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, STRICT, H)
    return q.to(tl.float32) * factor, decay_last


@triton.jit
def _tile(i_k, i_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Lanes of K block ``i_k`` and V block ``i_v``, their masks, and the state tile's offsets."""
    r_k = i_k * BK + tl.arange(0, BK)
    r_v = i_v * BV + tl.arange(0, BV)
    m_k = r_k < K
    m_v = r_v < V
    return r_k, r_v, m_k, m_v, m_k[:, None] & m_v[None, :], r_k[:, None] * V + r_v[None, :]


@triton.jit
def _block(i, B: tl.constexpr, N: tl.constexpr):
    """Lanes of block ``i`` of size ``B`` over a dim of ``N``, and their mask."""
    r = i * B + tl.arange(0, B)
    return r, r < N


@triton.jit
def _rows_of(ptr, rows, m_t, r, m_r, W: tl.constexpr):
    """A chunk's rows of a [T*, H, W] tensor on lanes ``r`` ([C, len(r)], zero outside)."""
    return tl.load(ptr + rows[:, None] * W + r[None, :], mask=m_t[:, None] & m_r[None, :],
                   other=0.0)


@triton.jit
def _causal(r_c, STRICT: tl.constexpr):
    """Which (t, s) pairs of a chunk a readout sees: s <= t (s < t when STRICT)."""
    return _seen(r_c, r_c, STRICT)


@triton.jit
def _seen(t, s, STRICT: tl.constexpr):
    """Which of the queries at positions ``t`` see the keys at positions ``s`` ([len(t),
    len(s)]): s <= t (s < t when STRICT)."""
    if STRICT:
        return t[:, None] > s[None, :]
    else:
        return t[:, None] >= s[None, :]


@triton.jit
def _chunk_scores(q_ptr, k_ptr, lam_ptr, rows, m_t, r_c, K: tl.constexpr, BK: tl.constexpr,
                  NK: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr, STRICT: tl.constexpr,
                  DOT: tl.constexpr):
    """A chunk's causal scores A[t, s] = q_t . k_s exp(bq_t - b_s) summed over the K blocks
    (no or scalar decays), and the scalar decay mask exp(bq_t - b_s) (1 without decay)."""
    A = tl.zeros([C, C], dtype=tl.float32)
    for i_k in tl.static_range(NK):
        r_k, m_k = _block(i_k, BK, K)
        q = _rows_of(q_ptr, rows, m_t, r_k, m_k, K)
        k = _rows_of(k_ptr, rows, m_t, r_k, m_k, K)
        A += _mm_of_loaded(q, tl.trans(k), DOT)
    mask = 1.0
    if DECAY == 1:
        b, bq, _ = _decays(lam_ptr, rows, m_t, r_c, m_t, K, DECAY, STRICT)
        mask = tl.exp(tl.minimum(bq[:, None] - b[None, :], 0.0))
        A = A * mask
    return tl.where(_causal(r_c, STRICT), A, 0.0), mask


@triton.jit
def _state_walk(s_ptr, z_ptr, cu_seqlens_ptr, chunk_offsets_ptr, T, H: tl.constexpr,
                K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                NV: tl.constexpr, C: tl.constexpr, IS_VARLEN: tl.constexpr,
                LOAD: tl.constexpr, NORM: tl.constexpr):
    """Where an ordered state kernel's program (grid (K blocks * V blocks, sequences *
    heads)) starts: its sequence and head, the sequence's rows and first checkpoint, its
    state tile's lanes and masks, and the walk's carried [BK, BV] tile and normalizer K
    tile (``m_z``: kept by the first V block's programs), zero or, with LOAD, read from
    ``s_ptr`` ([N * H, K, V]) and ``z_ptr`` ([N * H, K])."""
    i_kv, i_nh = tl.program_id(0), tl.program_id(1)
    i_k, i_v = i_kv // NV, i_kv % NV
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, ck_base = _sequence(cu_seqlens_ptr, chunk_offsets_ptr, i_n, T, C, IS_VARLEN)
    r_c = tl.arange(0, C)
    r_k, r_v, m_k, m_v, m_kv, p_kv = _tile(i_k, i_v, K, V, BK, BV)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    m_z = m_k & (tl.zeros([BK], dtype=tl.int32) + i_v == 0)    # z: first V block only
    if LOAD:
        S += tl.load(s_ptr + i_nh * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
        if NORM:
            z += tl.load(z_ptr + i_nh * K + r_k, mask=m_k, other=0.0)
    return i_nh, i_h, bos, eos, ck_base, r_c, r_k, r_v, m_k, m_v, m_kv, p_kv, S, z, m_z


@triton.jit
def chunk_states_kernel(
    k_ptr, v_ptr, lam_ptr, s0_ptr, sT_ptr, ckpt_ptr, cu_seqlens_ptr, chunk_offsets_ptr, T,
    w_ptr, u_ptr, x_ptr, z0_ptr, zT_ptr, zckpt_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NV: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT: tl.constexpr, DELTA: tl.constexpr = False,
    LOW_RANK: tl.constexpr = False, NORM: tl.constexpr = False,
    STORE_FINAL: tl.constexpr = True, PREDECAYED: tl.constexpr = False,
):
    """Grid (K blocks * V blocks, sequences * heads): one state tile at every chunk start
    (ckpt) and after the last token (sT, unless not STORE_FINAL), in chunk order. DELTA (the
    delta rule in its WY form, one K block): a chunk's values are its updates u = U0 - W S,
    from ``u_ptr`` (U0, overwritten with u) and ``w_ptr`` (``delta_wy_kernel``) and the
    start state. LOW_RANK (RWKV-7): u is written along x (``x_ptr``), and k v^T adds as
    well. NORM: the normalizer z (a column of ones as its value: z' = exp(b_last) z +
    sum_t k_dec_t) rides along, its K tile kept by the programs of the first V block
    (``z0``, ``zT``, ``zckpt``: [N, H, K], [N, H, K], [chunks, H, K]). PREDECAYED (diagonal
    decays): ``k_ptr`` (and ``x_ptr``) hold the keys (and x) decayed to their chunk's end
    already (``chunk_cumsum_kernel``'s KEYS, ``chunk_predecay_kernel``)."""
    i_nh, i_h, bos, eos, ck_base, r_c, r_k, r_v, m_k, m_v, m_kv, p_kv, S, z, m_z = \
        _state_walk(s0_ptr, z0_ptr, cu_seqlens_ptr, chunk_offsets_ptr, T, H, K, V, BK, BV, NV,
                    C, IS_VARLEN, USE_INITIAL_STATE, NORM)
    KEY_DECAY: tl.constexpr = 0 if PREDECAYED else DECAY    # (what the kernel applies)
    for i_c in range(0, tl.cdiv(eos - bos, C)):
        m_t = bos + i_c * C + r_c < eos
        rows = (bos + i_c * C + r_c) * H + i_h
        k = _rows_of(k_ptr, rows, m_t, r_k, m_k, K)
        if DELTA:
            p_u = rows[:, None] * V + r_v[None, :]
            m_u = m_t[:, None] & m_v[None, :]
            u = (tl.load(u_ptr + p_u, mask=m_u, other=0.0)
                 - _mm(_rows_of(w_ptr, rows, m_t, r_k, m_k, K), S, DOT))
            tl.store(u_ptr + p_u, u, mask=m_u)
        tl.store(ckpt_ptr + ((ck_base + i_c) * H + i_h) * K * V + p_kv,
                 S.to(ckpt_ptr.dtype.element_ty), mask=m_kv)
        if PREDECAYED:
            factor = 1.0
            decay_last = _chunk_end_decay(lam_ptr, _last_row(bos, eos, i_c, C, H, i_h), r_k,
                                          m_k, K)
        else:
            factor, decay_last = _key_factor(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, H)
        if LOW_RANK:
            S = (S * decay_last
                 + _decayed_t_mm(_rows_of(x_ptr, rows, m_t, r_k, m_k, K), factor, u,
                                 KEY_DECAY, DOT)
                 + _decayed_t_mm(k, factor, _rows_of(v_ptr, rows, m_t, r_v, m_v, V),
                                 KEY_DECAY, DOT))
        else:
            if not DELTA:
                u = _rows_of(v_ptr, rows, m_t, r_v, m_v, V)
            S = S * decay_last + _decayed_t_mm(k, factor, u, KEY_DECAY, DOT)
        if NORM:
            tl.store(zckpt_ptr + ((ck_base + i_c) * H + i_h) * K + r_k, z, mask=m_z)
            z = z * _lane_decay(decay_last, DECAY) + tl.sum(k.to(tl.float32) * factor, axis=0)
    if STORE_FINAL:
        tl.store(sT_ptr + i_nh * K * V + p_kv, S, mask=m_kv)
    if NORM:
        tl.store(zT_ptr + i_nh * K + r_k, z, mask=m_z)


@triton.jit
def chunk_cumsum_kernel(lam_ptr, b_ptr, chunk_table_ptr, k_ptr, kd_ptr, H: tl.constexpr,
                        K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr,
                        KEYS: tl.constexpr = False):
    """Grid (chunks, K blocks, heads), diagonal decays: b = the in-chunk cumulative log decay
    (inclusive, fp32) of every token, [T*, H, K] like lam, run once per call: every diagonal
    decay kernel reads the rows it needs from it (``lam_ptr`` of the DECAY 2 kernels), so
    both sides of a pair see the same numbers (an exponent b_t - b_t is exactly 0). KEYS:
    also the keys decayed to their chunk's end, k exp(b_last - b), to ``kd_ptr`` (as
    ``chunk_predecay_kernel``)."""
    i_g, i_k, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    r_c = tl.arange(0, C)
    rows, m_t = _chunk(chunk_table_ptr, i_h, H, r_c)
    r_k, m_k = _block(i_k, BK, K)
    lam = _rows_of(lam_ptr, rows, m_t, r_k, m_k, K).to(tl.float32)
    b = tl.cumsum(lam, axis=0)
    tl.store(b_ptr + rows[:, None] * K + r_k[None, :], b, mask=m_t[:, None] & m_k[None, :])
    if KEYS:
        _store_decayed(k_ptr, kd_ptr, rows, m_t, r_k, m_k,
                       tl.exp(_at_last(b, rows, m_t)[None, :] - b), K)


@triton.jit
def chunk_predecay_kernel(b_ptr, q_ptr, k_ptr, qd_ptr, kd_ptr, chunk_table_ptr,
                          H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr,
                          STRICT: tl.constexpr, QUERIES: tl.constexpr, KEYS: tl.constexpr):
    """Grid (chunks, K blocks, heads), diagonal decays: the queries decayed to their chunk's
    start, q exp(bq), to ``qd_ptr`` (QUERIES) and the keys to its end, k exp(b_last - b), to
    ``kd_ptr`` (KEYS), [T*, H, K] in those buffers' dtypes, from the cumulative log decays
    ``b_ptr``. The ordered kernels take them (PREDECAYED) where their dots round the decayed
    tiles to bf16 anyway: the same numbers, without an exp per token and lane in every V
    block's program at every step of the walk."""
    i_g, i_k, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    r_c = tl.arange(0, C)
    rows, m_t = _chunk(chunk_table_ptr, i_h, H, r_c)
    r_k, m_k = _block(i_k, BK, K)
    b, bq, b_last = _decays(b_ptr, rows, m_t, r_k, m_k, K, 2, STRICT, H)
    if QUERIES:
        _store_decayed(q_ptr, qd_ptr, rows, m_t, r_k, m_k, tl.exp(bq), K)
    if KEYS:
        _store_decayed(k_ptr, kd_ptr, rows, m_t, r_k, m_k, tl.exp(b_last[None, :] - b), K)


@triton.jit
def _at_last(b, rows, m_t):
    """b's row ([BK]) at the chunk's last token (its last row in ``m_t``)."""
    last = rows == tl.max(tl.where(m_t, rows, -1), axis=0)
    return tl.sum(tl.where(last[:, None], b, 0.0), axis=0)


@triton.jit
def _store_decayed(x_ptr, xd_ptr, rows, m_t, r_k, m_k, factor, K: tl.constexpr):
    """x * factor (x's [C, BK] rows in fp32, times the decay factor) to ``xd_ptr``."""
    p = rows[:, None] * K + r_k[None, :]
    m = m_t[:, None] & m_k[None, :]
    x = tl.load(x_ptr + p, mask=m, other=0.0).to(tl.float32)
    tl.store(xd_ptr + p, (x * factor).to(xd_ptr.dtype.element_ty), mask=m)


@triton.jit
def _chunk_end_decay(lam_ptr, last_row, r_k, m_k, K: tl.constexpr):
    """Diagonal decays: the whole chunk's decay per K lane, exp(b_last) ([BK, 1]), read
    from the cumulative log decays at the chunk's last row."""
    return tl.exp(tl.load(lam_ptr + last_row * K + r_k, mask=m_k, other=0.0))[:, None]


@triton.jit
def _last_row(bos, eos, i_c, C: tl.constexpr, H: tl.constexpr, i_h):
    """The row ([T*, H] order) of chunk ``i_c``'s last token in the sequence [bos, eos)."""
    return (tl.minimum(bos + i_c * C + C, eos) - 1) * H + i_h


@triton.jit
def _cumulative(b_ptr, t0, eos, start, r, i_h, r_k, m_k, H: tl.constexpr, K: tl.constexpr,
                STRICT: tl.constexpr):
    """b and bq (the exponent a query sees: b, or b of the row before when STRICT; 0 before
    the chunk's first row) of the chunk rows ``start + r`` on lanes ``r_k``, read from the
    cumulative-decay buffer; rows past the sequence read 0."""
    tok = t0 + start + r
    m = (tok < eos)[:, None] & m_k[None, :]
    b = tl.load(b_ptr + ((tok * H + i_h) * K)[:, None] + r_k[None, :], mask=m, other=0.0)
    if STRICT:
        m_prev = m & ((start + r) > 0)[:, None]
        bq = tl.load(b_ptr + (((tok - 1) * H + i_h) * K)[:, None] + r_k[None, :], mask=m_prev,
                     other=0.0)
    else:
        bq = b
    return b, bq


@triton.jit
def _cumulative_row(b_ptr, t0, eos, row, i_h, r_k, m_k, H: tl.constexpr, K: tl.constexpr,
                    STRICT: tl.constexpr):
    """``_cumulative`` of the one chunk row ``row`` ([BK] each); 0 before the chunk."""
    tok = t0 + row + 0 * r_k     # (a vector: the interpreter refuses a scalar mask term)
    m = m_k & (tok >= t0) & (tok < eos)
    b = tl.load(b_ptr + (tok * H + i_h) * K + r_k, mask=m, other=0.0)
    if STRICT:
        bq = tl.load(b_ptr + ((tok - 1) * H + i_h) * K + r_k, mask=m & (tok > t0), other=0.0)
    else:
        bq = b
    return b, bq


@triton.jit
def _row(ptr, t0, eos, row, i_h, r_k, m_k, H: tl.constexpr, K: tl.constexpr):
    """Chunk row ``row`` of a [T*, H, K] tensor on lanes ``r_k``, fp32 (0 past the end)."""
    tok = t0 + row + 0 * r_k
    return tl.load(ptr + (tok * H + i_h) * K + r_k, mask=m_k & (tok < eos),
                   other=0.0).to(tl.float32)


@triton.jit
def _store_subchunk_scores(q_i, bq_i, k_ptr, b_ptr, A_ptr, p_i, t0, eos, start, i_h, r_k, m_k,
                           H: tl.constexpr, K: tl.constexpr, SUB: tl.constexpr,
                           STRICT: tl.constexpr):
    """Stores the scores within the sub-chunk at chunk row ``start`` under a diagonal decay,
    A[t, j] = sum_k q[t,k] k[j,k] exp(bq[t,k] - b[j,k]) for j <= t (j < t when STRICT; 0
    above), column by column at ``p_i`` (the offsets of the sub-chunk's rows in A, column
    ``start``): one key row j at a time, its k and b read from memory, every exponent
    <= 0. Each column goes straight from the reduction to memory (no [SUB, SUB]
    accumulator to re-layout every row)."""
    r_s = tl.arange(0, SUB)
    for j in range(0, SUB):
        k_j = _row(k_ptr, t0, eos, start + j, i_h, r_k, m_k, H, K)
        b_j, bq_j = _cumulative_row(b_ptr, t0, eos, start + j, i_h, r_k, m_k, H, K, False)
        col = tl.sum(q_i * tl.exp(tl.minimum(bq_i - b_j[None, :], 0.0)) * k_j[None, :], axis=1)
        if STRICT:
            col = tl.where(r_s > j, col, 0.0)
        else:
            col = tl.where(r_s >= j, col, 0.0)
        tl.store(A_ptr + p_i + j, col.to(A_ptr.dtype.element_ty))


@triton.jit
def _subchunk_rows(ptr, chunk_table_ptr, t0, eos, j, i_h, r_k, m_k, H: tl.constexpr,
                   K: tl.constexpr, SUB: tl.constexpr):
    """The rows of sub-chunk ``j`` of a [T*, H, K] tensor on lanes ``r_k``, fp32."""
    tok = t0 + j * SUB + tl.arange(0, SUB)
    return _rows_of(ptr, tok * H + i_h, tok < eos, r_k, m_k, K).to(tl.float32)


@triton.jit
def _subchunk_grads(bq_i, b_i, q_ptr, k_ptr, b_ptr, dA_ptr, p0, t0, eos, start, i_h, r_k, m_k,
                    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr,
                    STRICT: tl.constexpr):
    """dq and dk of the pairs within the sub-chunk at chunk row ``start`` given
    dA[t, j] = dy_t . v_j (causal, zero elsewhere; ``p0`` the offset of the sub-chunk's
    first row in the dA buffer): token j is the key of dq[t] += dA[t, j] k_j exp(bq_t - b_j)
    and the query of dk[s] += dA[j, s] q_j exp(bq_j - b_s), its rows read from memory (no
    reductions), every exponent <= 0."""
    r_s = tl.arange(0, SUB)
    p_i = p0 + r_s * (H * C) + start                    # dA[sub-chunk rows, column start]
    dq = tl.zeros(bq_i.shape, dtype=tl.float32)
    dk = tl.zeros(bq_i.shape, dtype=tl.float32)
    for j in range(0, SUB):
        b_j, bq_j = _cumulative_row(b_ptr, t0, eos, start + j, i_h, r_k, m_k, H, K, STRICT)
        k_j = _row(k_ptr, t0, eos, start + j, i_h, r_k, m_k, H, K)
        q_j = _row(q_ptr, t0, eos, start + j, i_h, r_k, m_k, H, K)
        dA_col = tl.load(dA_ptr + p_i + j).to(tl.float32)                         # dA[:, j]
        dA_row = tl.load(dA_ptr + p0 + j * (H * C) + start + r_s).to(tl.float32)  # dA[j, :]
        dq += dA_col[:, None] * k_j[None, :] * tl.exp(tl.minimum(bq_i - b_j[None, :], 0.0))
        dk += dA_row[:, None] * q_j[None, :] * tl.exp(tl.minimum(bq_j[None, :] - b_i, 0.0))
    return dq, dk


#: largest spread of the cumulative log decay within a sub-chunk (over every lane) for which
#: its own pairs go through a dot (``SPREAD`` of the diagonal kernels): exp(b_ref - b) <=
#: exp(60) and exp(bq - b_ref) >= exp(-60) stay normal fp32 and bf16 numbers; steeper
#: sub-chunks go row by row. 0 sends every sub-chunk row by row.
SPREAD_FOR_DOT = 60.0


@triton.jit
def _spread(b_ref, b_i):
    """The largest b_ref - b over the sub-chunk's rows and lanes (padded rows read 0)."""
    return tl.max(tl.max(b_ref[None, :] - b_i, axis=1), axis=0)


@triton.jit
def chunk_diag_scores_kernel(
    q_ptr, k_ptr, b_ptr, A_ptr, chunk_table_ptr,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, STRICT: tl.constexpr,
    DOT: tl.constexpr, SUB: tl.constexpr = 16, KP: tl.constexpr = 16,
    SPREAD: tl.constexpr = SPREAD_FOR_DOT,
):
    """Grid (chunks, sub-chunks, heads), diagonal decays: the intra-chunk scores of the SUB
    queries of sub-chunk ``i_s``, A[t, s] = sum_k q[t,k] k[s,k] exp(bq[t,k] - b[s,k]), stored
    as rows of A [chunks * C, H, C] for the output kernel (b: ``chunk_cumsum_kernel``), all
    KP lanes of K at once. Both sides are decayed against the reference b_ref = b just
    before the query sub-chunk, q exp(bq - b_ref) (exponent <= 0: b falls along the chunk)
    and k exp(b_ref - b), one [SUB, SUB] dot per key sub-chunk: the earlier ones (exponent
    <= 0) and the sub-chunk itself (exponent >= 0 but at most the sub-chunk's decay spread)
    when that spread is below ``SPREAD``; a steeper sub-chunk's own pairs go row by row
    (``_store_subchunk_scores``, every exponent <= 0). Later columns are 0."""
    i_g, i_s, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    t0, eos, bos = _span(chunk_table_ptr)
    r_s = tl.arange(0, SUB)
    r_c = tl.arange(0, C)
    r_k = tl.arange(0, KP)
    m_k = r_k < K
    start = i_s * SUB
    p_i = ((i_g * C + start + r_s) * H + i_h) * C       # the sub-chunk's rows of A
    q_i = _subchunk_rows(q_ptr, chunk_table_ptr, t0, eos, i_s, i_h, r_k, m_k, H, K, SUB)
    b_i, bq_i = _cumulative(b_ptr, t0, eos, start, r_s, i_h, r_k, m_k, H, K, STRICT)
    b_ref, bq_ref = _cumulative_row(b_ptr, t0, eos, start - 1, i_h, r_k, m_k, H, K, False)
    q_ref = q_i * tl.exp(tl.minimum(bq_i - b_ref[None, :], 0.0))
    spread = _spread(b_ref, b_i)
    for j in range(0, i_s + (spread < SPREAD).to(tl.int32)):
        b_j, bq_j = _cumulative(b_ptr, t0, eos, j * SUB, r_s, i_h, r_k, m_k, H, K, False)
        k_j = _subchunk_rows(k_ptr, chunk_table_ptr, t0, eos, j, i_h, r_k, m_k, H, K, SUB)
        k_ref = k_j * tl.exp(tl.minimum(b_ref[None, :] - b_j, SPREAD))
        D = tl.where(_seen(start + r_s, j * SUB + r_s, STRICT),
                     _mm(q_ref, tl.trans(k_ref), DOT), 0.0)
        tl.store(A_ptr + p_i[:, None] + (j * SUB + r_s)[None, :], D.to(A_ptr.dtype.element_ty))
    tl.store(A_ptr + p_i[:, None] + r_c[None, :], tl.zeros([SUB, C], dtype=A_ptr.dtype.element_ty),
             mask=(r_c >= start + SUB)[None, :])
    if spread >= SPREAD:
        _store_subchunk_scores(q_i, bq_i, k_ptr, b_ptr, A_ptr, p_i + start, t0, eos, start,
                               i_h, r_k, m_k, H, K, SUB, STRICT)


@triton.jit
def _output_of_v_block(
    i_v, A, q_ptr, k_ptr, v_ptr, lam_ptr, y_ptr, ckpt_ptr, chunk_table_ptr, A2_ptr, v2_ptr,
    p_A, scale, rows, m_t, r_c, i_g, i_h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, DECAY: tl.constexpr,
    STRICT: tl.constexpr, DOT: tl.constexpr, PARALLEL: tl.constexpr, SECOND: tl.constexpr,
):
    """``chunk_output_kernel``'s y on V block ``i_v`` (stored): the earlier chunks (through
    the start state, or pair by pair in the PARALLEL form) plus the scores times v."""
    C: tl.constexpr = r_c.shape[0]
    r_v, m_v = _block(i_v, BV, V)
    if PARALLEL:    # earlier chunks, pair by pair
        y = _cross_block_output(q_ptr, k_ptr, v_ptr, lam_ptr, chunk_table_ptr, rows,
                                m_t, r_c, r_v, m_v, i_h, H, K, V, BK, NK, DECAY,
                                STRICT, DOT)
    else:           # earlier chunks, through S
        y = tl.zeros([C, BV], dtype=tl.float32)
        for i_k in tl.static_range(NK):
            r_k, r_v, m_k, m_v, m_kv, p_kv = _tile(i_k, i_v, K, V, BK, BV)
            S = tl.load(ckpt_ptr + (i_g * H + i_h) * K * V + p_kv, mask=m_kv, other=0.0)
            q = _rows_of(q_ptr, rows, m_t, r_k, m_k, K)
            if DECAY == 2:  # the query decayed to the chunk start, per channel
                q, _ = _query_decay(q, lam_ptr, rows, m_t, r_k, m_k, K, DECAY, STRICT, H)
            # (bf16 queries and states, as the delta rules' half path stores them, multiply
            # exactly in bf16 where the scores' dot below takes tf32)
            y += _mm_of_loaded(q, S, DOT)
        if DECAY == 1:
            q_factor, _ = _query_factor(lam_ptr, rows, m_t, r_c, m_t, K, DECAY, STRICT, H)
            y = y * q_factor
    y += _mm(A, _rows_of(v_ptr, rows, m_t, r_v, m_v, V), DOT)
    if SECOND:
        y += _mm(tl.load(A2_ptr + p_A, mask=m_t[:, None], other=0.0),
                 _rows_of(v2_ptr, rows, m_t, r_v, m_v, V), DOT)
    y = y * scale
    tl.store(y_ptr + rows[:, None] * V + r_v[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


@triton.jit
def chunk_output_kernel(
    q_ptr, k_ptr, v_ptr, lam_ptr, y_ptr, ckpt_ptr, chunk_table_ptr, A_ptr, scale, v2_ptr,
    A2_ptr, zckpt_ptr, ycol_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NK: tl.constexpr, NV: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr,
    STRICT: tl.constexpr, DOT: tl.constexpr, SUB: tl.constexpr = 16,
    PARALLEL: tl.constexpr = False, SECOND: tl.constexpr = False, NORM: tl.constexpr = False,
):
    """Grid (chunks, heads): y of one chunk, times ``scale`` (constant factors of the query
    and key, taken out of them by the compiler). The scores are built once over the K blocks;
    each V block of y is then scores @ v plus the queries, decayed to the chunk start,
    times the start state. Diagonal decays read their scores from
    ``chunk_diag_scores_kernel`` (``A_ptr``) and decay the queries per channel. SECOND
    (RWKV-7's k v^T beside x u^T): y adds the scores ``A2_ptr`` (stored the same way) times
    the values ``v2_ptr``. NORM: also the normalizer's read, the queries times the chunk's
    start z (``zckpt``) plus the scores' row sums (a column of ones as the value), to
    ``ycol`` ([T*, H], fp32)."""
    i_g, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    r_c = tl.arange(0, C)
    rows, m_t = _chunk(chunk_table_ptr, i_h, H, r_c)
    p_A = ((i_g * C + r_c) * H + i_h)[:, None] * C + r_c[None, :]    # its [C, C] score block
    if DECAY == 2:      # scores from chunk_diag_scores_kernel
        A = tl.load(A_ptr + p_A, mask=m_t[:, None], other=0.0)
    else:
        A, _ = _chunk_scores(q_ptr, k_ptr, lam_ptr, rows, m_t, r_c, K, BK, NK, C, DECAY,
                             STRICT, DOT)
    if NORM:
        y_col = tl.zeros([C], dtype=tl.float32)
        for i_k in tl.static_range(NK):
            r_k, m_k = _block(i_k, BK, K)
            q = _rows_of(q_ptr, rows, m_t, r_k, m_k, K)
            if DECAY == 2:
                q, _ = _query_decay(q, lam_ptr, rows, m_t, r_k, m_k, K, DECAY, STRICT, H)
            z = tl.load(zckpt_ptr + (i_g * H + i_h) * K + r_k, mask=m_k, other=0.0)
            y_col += tl.sum(q.to(tl.float32) * z[None, :], axis=1)
        if DECAY == 1:
            q_factor, _ = _query_factor(lam_ptr, rows, m_t, r_c, m_t, K, DECAY, STRICT, H)
            y_col = y_col * tl.sum(q_factor, axis=1)
        tl.store(ycol_ptr + rows, (y_col + tl.sum(A, axis=1)) * scale, mask=m_t)
    UNROLL_V: tl.constexpr = NV if NV <= MAX_UNROLLED_V else 0
    for i_v in tl.static_range(UNROLL_V):
        _output_of_v_block(i_v, A, q_ptr, k_ptr, v_ptr, lam_ptr, y_ptr, ckpt_ptr,
                           chunk_table_ptr, A2_ptr, v2_ptr, p_A, scale, rows, m_t, r_c, i_g,
                           i_h, H, K, V, BK, BV, NK, DECAY, STRICT, DOT, PARALLEL, SECOND)
    for i_v in range(UNROLL_V, NV):
        _output_of_v_block(i_v, A, q_ptr, k_ptr, v_ptr, lam_ptr, y_ptr, ckpt_ptr,
                           chunk_table_ptr, A2_ptr, v2_ptr, p_A, scale, rows, m_t, r_c, i_g,
                           i_h, H, K, V, BK, BV, NK, DECAY, STRICT, DOT, PARALLEL, SECOND)


@triton.jit
def _local_du_of_v_block(i_v, A, rows, m_t, dy_ptr, du_ptr, V: tl.constexpr,
                         BV: tl.constexpr, DOT: tl.constexpr):
    """``chunk_local_du_kernel`` on V block ``i_v``: A^T dy, stored."""
    r_v, m_v = _block(i_v, BV, V)
    tl.store(du_ptr + rows[:, None] * V + r_v[None, :],
             _mm(tl.trans(A), _rows_of(dy_ptr, rows, m_t, r_v, m_v, V), DOT),
             mask=m_t[:, None] & m_v[None, :])


@triton.jit
def chunk_local_du_kernel(
    q_ptr, k_ptr, lam_ptr, A_ptr, dy_ptr, du_ptr, chunk_table_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NV: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr, STRICT: tl.constexpr,
    DOT: tl.constexpr,
):
    """Grid (chunks, heads), every chunk at once: the part of the delta rule's dU that needs
    no state, A^T dy (A: the readout's in-chunk scores with their decays; diagonal decays'
    from ``A_ptr``), into ``du_ptr`` ([T*, H, V], fp32). The ordered state-gradient walk
    (``chunk_dstates_kernel``, LOCAL_DU) then adds only the state's part, instead of making
    the scores again in every chunk step of every V tile's program."""
    i_g, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    r_c = tl.arange(0, C)
    rows, m_t = _chunk(chunk_table_ptr, i_h, H, r_c)
    if DECAY == 2:
        A = tl.load(A_ptr + ((i_g * C + r_c) * H + i_h)[:, None] * C + r_c[None, :])
    else:
        A, _ = _chunk_scores(q_ptr, k_ptr, lam_ptr, rows, m_t, r_c, K, BK, 1, C, DECAY,
                             STRICT, DOT)
    UNROLL_V: tl.constexpr = NV if NV <= MAX_UNROLLED_V else 0
    for i_v in tl.static_range(UNROLL_V):
        _local_du_of_v_block(i_v, A, rows, m_t, dy_ptr, du_ptr, V, BV, DOT)
    for i_v in range(UNROLL_V, NV):
        _local_du_of_v_block(i_v, A, rows, m_t, dy_ptr, du_ptr, V, BV, DOT)


@triton.jit
def chunk_dstates_kernel(
    q_ptr, lam_ptr, dy_ptr, dsT_ptr, ds0_ptr, dckpt_ptr, cu_seqlens_ptr, chunk_offsets_ptr, T,
    k_ptr, w_ptr, A_ptr, du_ptr, dycol_ptr, dzT_ptr, dz0_ptr, dzckpt_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NV: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr, STRICT: tl.constexpr,
    USE_FINAL_STATE_GRAD: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr,
    DELTA: tl.constexpr = False, NORM: tl.constexpr = False, LOCAL_DU: tl.constexpr = False,
    PREDECAYED: tl.constexpr = False,
):
    """Grid (K blocks * V blocks, sequences * heads), chunks last to first: one tile of the
    gradient of every chunk's end state (dckpt) and of the initial state (ds0). DELTA (one
    K block): the chunk's updates u = U0 - W S took part in its readout and end state, so
    their gradient dU = scores^T dy + (k exp(b_last - b)) dS goes to ``du_ptr`` and the
    start state's gradient gains -W^T dU (scores of diagonal decays from ``A_ptr``); with
    LOCAL_DU, ``du_ptr`` holds scores^T dy already (``chunk_local_du_kernel``). NORM:
    the normalizer's gradient dz rides along in the first V block's programs, from the
    gradient of its reads (``dycol``, [T*, H]): dz = exp(b_last) dz' + q_dec^T dycol.
    PREDECAYED (diagonal decays): ``q_ptr`` holds the queries decayed to their chunk's start
    and ``k_ptr`` the keys decayed to its end (``chunk_predecay_kernel``)."""
    i_nh, i_h, bos, eos, ck_base, r_c, r_k, r_v, m_k, m_v, m_kv, p_kv, dS, dz, m_z = \
        _state_walk(dsT_ptr, dzT_ptr, cu_seqlens_ptr, chunk_offsets_ptr, T, H, K, V, BK, BV,
                    NV, C, IS_VARLEN, USE_FINAL_STATE_GRAD, NORM)
    KEY_DECAY: tl.constexpr = 0 if PREDECAYED else DECAY    # (what the kernel applies)
    n_chunks = tl.cdiv(eos - bos, C)
    for i_r in range(0, n_chunks):
        i_c = n_chunks - 1 - i_r
        m_t = bos + i_c * C + r_c < eos
        rows = (bos + i_c * C + r_c) * H + i_h
        tl.store(dckpt_ptr + ((ck_base + i_c) * H + i_h) * K * V + p_kv,
                 dS.to(dckpt_ptr.dtype.element_ty), mask=m_kv)
        if NORM:
            tl.store(dzckpt_ptr + ((ck_base + i_c) * H + i_h) * K + r_k, dz, mask=m_z)
        dy = _rows_of(dy_ptr, rows, m_t, r_v, m_v, V)
        if DECAY == 1:  # (one scan of the chunk's log decays for both sides)
            k_factor, q_factor, decay_last = _scalar_factors(lam_ptr, rows, m_t, STRICT)
        if PREDECAYED:
            k_factor = 1.0
            q_factor = 1.0
            decay_last = _chunk_end_decay(lam_ptr, _last_row(bos, eos, i_c, C, H, i_h), r_k,
                                          m_k, K)
        if DELTA:
            p_u = rows[:, None] * V + r_v[None, :]
            m_u = m_t[:, None] & m_v[None, :]
            if LOCAL_DU:
                dU = tl.load(du_ptr + p_u, mask=m_u, other=0.0)
            elif DECAY == 2:
                dU = _mm(tl.trans(tl.load(A_ptr + (((ck_base + i_c) * C + r_c) * H
                                                   + i_h)[:, None] * C + r_c[None, :])),
                         dy, DOT)
            else:
                A, _ = _chunk_scores(q_ptr, k_ptr, lam_ptr, rows, m_t, r_c, K, BK, 1, C,
                                     DECAY, STRICT, DOT)
                dU = _mm(tl.trans(A), dy, DOT)
            if DECAY != 1 and not PREDECAYED:
                k_factor, _ = _key_factor(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, H)
            dU += _decayed_mm(_rows_of(k_ptr, rows, m_t, r_k, m_k, K), k_factor, dS,
                              KEY_DECAY, DOT)
            tl.store(du_ptr + p_u, dU, mask=m_u)
        # (the query side after dU: fewer [C, K] tiles live at once)
        q = _rows_of(q_ptr, rows, m_t, r_k, m_k, K)
        if DECAY != 1 and not PREDECAYED:
            q_factor, decay_last = _query_factor(lam_ptr, rows, m_t, r_k, m_k, K, DECAY,
                                                 STRICT, H)
        dS = dS * decay_last + _decayed_t_mm(q, q_factor, dy, KEY_DECAY, DOT)
        if DELTA:
            dS -= _mm(tl.trans(_rows_of(w_ptr, rows, m_t, r_k, m_k, K)), dU, DOT)
        if NORM:
            dz = dz * _lane_decay(decay_last, DECAY) + tl.sum(
                q.to(tl.float32) * q_factor
                * tl.load(dycol_ptr + rows, mask=m_t, other=0.0)[:, None], axis=0)
    tl.store(ds0_ptr + i_nh * K * V + p_kv, dS, mask=m_kv)
    if NORM:
        tl.store(dz0_ptr + i_nh * K + r_k, dz, mask=m_z)


@triton.jit
def _dlam(qdq, kdk, last, STRICT: tl.constexpr):
    """Gradient of the log decays lam_j from the per-token q.dq and k.dk (over K lanes, or
    summed) and the chunk total decay's term: lam_j enters every b_t with t >= j (bq_t with
    t > j when STRICT) and b_last."""
    later_q = tl.sum(qdq, axis=0) - tl.cumsum(qdq, axis=0)        # over t > j
    from_k = tl.sum(kdk, axis=0) - tl.cumsum(kdk, axis=0) + kdk   # over t >= j
    if STRICT:
        return later_q - from_k + last
    else:
        return later_q + qdq - from_k + last


@triton.jit
def chunk_diag_grads_kernel(
    q_ptr, k_ptr, b_ptr, dA_ptr, last_ptr, chunk_table_ptr, scale, dq_ptr, dk_ptr, dlam_ptr,
    H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr,
    STRICT: tl.constexpr, DOT: tl.constexpr, SUB: tl.constexpr = 16,
    SPREAD: tl.constexpr = SPREAD_FOR_DOT, Q_HELD_IN_DLAM: tl.constexpr = True,
    K_HELD_IN_DLAM: tl.constexpr = True, ADD_DLAM: tl.constexpr = False,
    ONE_SIDE: tl.constexpr = False,
):
    """Grid (chunks, K blocks, heads), diagonal decays, after ``chunk_grads_kernel``: adds the
    intra-chunk parts to dq and dk (which hold the parts through the chunk's states), then
    stores dq, dk and dlam (times ``scale``). Sub-chunk by sub-chunk of SUB rows, as in
    ``chunk_diag_scores_kernel``: pairs in different sub-chunks through [SUB, SUB] blocks of
    dA = dy v^T (read from ``dA_ptr``) in dots, both sides decayed against a reference
    between them (exponents <= 0); pairs within a sub-chunk through dots as well when the
    sub-chunk's decay spread is below ``SPREAD`` (as in the scores kernel), else row by row
    (``_subchunk_grads``). dlam's sums over later tokens run last sub-chunk first;
    ``last_ptr`` holds each lane's sum over V of S_next * dS.
    A backward with several products (KK beside QK, RWKV-7's four) adds each product's parts
    to the same buffers, with no zeroed buffers and adds between the calls: without
    Q_HELD_IN_DLAM (K_HELD_IN_DLAM) the dq (dk) it is given holds parts whose dlam terms
    are stored already, so dlam takes only this product's; ADD_DLAM adds to ``dlam_ptr``
    instead of storing; ONE_SIDE (a product of the keys with themselves): ``dq_ptr`` is
    ``dk_ptr``, which gains both sides' parts."""
    i_g, i_k, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    t0, eos, bos = _span(chunk_table_ptr)
    r_s = tl.arange(0, SUB)
    NS: tl.constexpr = C // SUB
    r_k, m_k = _block(i_k, BK, K)
    last = tl.load(last_ptr + (i_g * H + i_h) * K + r_k, mask=m_k, other=0.0)
    later_q = tl.zeros([BK], dtype=tl.float32)  # sums of q.dq and k.dk over later rows
    later_k = tl.zeros([BK], dtype=tl.float32)
    for jj in tl.static_range(NS):
        i_s = NS - 1 - jj
        start = i_s * SUB
        rows_i, m_i = _chunk(chunk_table_ptr, i_h, H, start + r_s)
        b_i, bq_i = _cumulative(b_ptr, t0, eos, start, r_s, i_h, r_k, m_k, H, K, STRICT)
        b_ref, bq_ref = _cumulative_row(b_ptr, t0, eos, start - 1, i_h, r_k, m_k, H, K, False)
        q_i = _subchunk_rows(q_ptr, chunk_table_ptr, t0, eos, i_s, i_h, r_k, m_k, H, K, SUB)
        k_i = _subchunk_rows(k_ptr, chunk_table_ptr, t0, eos, i_s, i_h, r_k, m_k, H, K, SUB)
        p_i = ((i_g * C + start + r_s) * H + i_h) * C        # the sub-chunk's rows of dA
        # the decay spread decides whether the sub-chunk's own pairs join the dots below
        spread = _spread(b_ref, b_i)
        own = (spread < SPREAD).to(tl.int32)
        b_low = tl.min(b_i, axis=0)     # b at the sub-chunk's last row (padded rows read 0)
        # keys of earlier sub-chunks (and its own): dq_i += (dA[i, j] @ k_j exp(b_ref - b_j))
        # exp(bq_i - b_ref)
        dq_i = tl.zeros([SUB, BK], dtype=tl.float32)
        for j in range(0, i_s + own):
            b_j, bq_j = _cumulative(b_ptr, t0, eos, j * SUB, r_s, i_h, r_k, m_k, H, K, False)
            k_j = _subchunk_rows(k_ptr, chunk_table_ptr, t0, eos, j, i_h, r_k, m_k, H, K, SUB)
            dA_ij = tl.load(dA_ptr + p_i[:, None] + (j * SUB + r_s)[None, :])
            dq_i += _mm(dA_ij, k_j * tl.exp(tl.minimum(b_ref[None, :] - b_j, SPREAD)), DOT)
        # queries of later sub-chunks (and its own): dk_i += (dA[j, i]^T @ q_j exp(bq_j -
        # b_low)) exp(b_low - b_i)
        dk_i = tl.zeros([SUB, BK], dtype=tl.float32)
        for j in range(i_s + 1 - own, NS):
            b_j, bq_j = _cumulative(b_ptr, t0, eos, j * SUB, r_s, i_h, r_k, m_k, H, K, STRICT)
            q_j = _subchunk_rows(q_ptr, chunk_table_ptr, t0, eos, j, i_h, r_k, m_k, H, K, SUB)
            p_j = ((i_g * C + j * SUB + r_s) * H + i_h) * C
            dA_ji = tl.load(dA_ptr + p_j[:, None] + (start + r_s)[None, :])
            dk_i += _mm(tl.trans(dA_ji), q_j * tl.exp(tl.minimum(bq_j - b_low[None, :], SPREAD)),
                        DOT)
        m_ik = m_i[:, None] & m_k[None, :]
        p_ik = rows_i[:, None] * K + r_k[None, :]
        dq_i = dq_i * tl.exp(tl.minimum(bq_i - b_ref[None, :], 0.0))
        dk_i = dk_i * tl.exp(tl.minimum(b_low[None, :] - b_i, 0.0))
        if spread >= SPREAD:    # steep decays: the sub-chunk's own pairs row by row
            dq_own, dk_own = _subchunk_grads(bq_i, b_i, q_ptr, k_ptr, b_ptr, dA_ptr,
                                             (i_g * C + start) * H * C + i_h * C, t0, eos,
                                             start, i_h, r_k, m_k, H, K, C, SUB, STRICT)
            dq_i += dq_own
            dk_i += dk_own
        # what the buffers held: the states' parts, or earlier products'
        dk_total = dk_i + tl.load(dk_ptr + p_ik, mask=m_ik, other=0.0).to(tl.float32)
        if ONE_SIDE:
            tl.store(dk_ptr + p_ik, ((dq_i + dk_total) * scale).to(dk_ptr.dtype.element_ty),
                     mask=m_ik)
            qdq = q_i * dq_i
        else:
            dq_total = dq_i + tl.load(dq_ptr + p_ik, mask=m_ik, other=0.0).to(tl.float32)
            tl.store(dq_ptr + p_ik, (dq_total * scale).to(dq_ptr.dtype.element_ty), mask=m_ik)
            tl.store(dk_ptr + p_ik, (dk_total * scale).to(dk_ptr.dtype.element_ty), mask=m_ik)
            qdq = q_i * (dq_total if Q_HELD_IN_DLAM else dq_i)
        kdk = k_i * (dk_total if K_HELD_IN_DLAM and not ONE_SIDE else dk_i)
        dlam = (_dlam(qdq, kdk, last[None, :], STRICT) + (later_q - later_k)[None, :]) * scale
        if ADD_DLAM:
            dlam += tl.load(dlam_ptr + p_ik, mask=m_ik, other=0.0)
        tl.store(dlam_ptr + p_ik, dlam, mask=m_ik)
        later_q += tl.sum(qdq, axis=0)
        later_k += tl.sum(kdk, axis=0)


@triton.jit
def _dv_of_k_block(dv, i_k, i_v, k_ptr, lam_ptr, dckpt_ptr, p_state, rows, m_t,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, DECAY: tl.constexpr, DOT: tl.constexpr):
    """dv of V block ``i_v`` plus K block ``i_k``'s part through the chunk's end state:
    (k exp(b_last - b)) dS."""
    r_k, r_v, m_k, m_v, m_kv, p_kv = _tile(i_k, i_v, K, V, BK, BV)
    k_dec, _ = _key_decay(_rows_of(k_ptr, rows, m_t, r_k, m_k, K), lam_ptr, rows, m_t, r_k,
                          m_k, K, DECAY, False, H)
    return dv + _mm(k_dec, tl.load(dckpt_ptr + p_state + p_kv, mask=m_kv, other=0.0), DOT)


@triton.jit
def _dv_of_v_block(
    i_v, A, q_ptr, k_ptr, lam_ptr, dy_ptr, dckpt_ptr, chunk_table_ptr, dv_ptr, scale, p_state,
    rows, m_t, r_c, i_h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, NK: tl.constexpr, DECAY: tl.constexpr, STRICT: tl.constexpr,
    DOT: tl.constexpr, PARALLEL: tl.constexpr,
):
    """``chunk_grads_kernel``'s dv on V block ``i_v`` (stored): A^T dy plus the part through
    the chunk's end state (or, PARALLEL, the later blocks' queries pair by pair)."""
    UNROLL_K: tl.constexpr = NK if NK <= MAX_UNROLLED_K else 0
    r_v, m_v = _block(i_v, BV, V)
    dv = _mm(tl.trans(A), _rows_of(dy_ptr, rows, m_t, r_v, m_v, V), DOT)
    if PARALLEL:
        dv += _later_blocks_dv(q_ptr, k_ptr, lam_ptr, dy_ptr, chunk_table_ptr, rows, m_t,
                               r_c, r_v, m_v, i_h, H, K, V, BK, NK, DECAY, STRICT, DOT)
    else:
        for i_k in tl.static_range(UNROLL_K):
            dv = _dv_of_k_block(dv, i_k, i_v, k_ptr, lam_ptr, dckpt_ptr, p_state, rows,
                                m_t, H, K, V, BK, BV, DECAY, DOT)
        for i_k in range(UNROLL_K, NK):
            dv = _dv_of_k_block(dv, i_k, i_v, k_ptr, lam_ptr, dckpt_ptr, p_state, rows,
                                m_t, H, K, V, BK, BV, DECAY, DOT)
    tl.store(dv_ptr + rows[:, None] * V + r_v[None, :],
             (dv * scale).to(dv_ptr.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _state_grads_of_v_block(i_k, i_v, dq, dk, last, decay_last, v_ptr, dy_ptr, ckpt_ptr,
                            dckpt_ptr, p_state, rows, m_t, K: tl.constexpr, V: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
                            DOT: tl.constexpr):
    """dq += dy S^T and dk += v dS^T on K block ``i_k`` from V block ``i_v`` of the chunk's
    start state S and end state gradient dS, and (decays) each lane's sum of S * dS."""
    r_k, r_v, m_k, m_v, m_kv, p_kv = _tile(i_k, i_v, K, V, BK, BV)
    S = tl.load(ckpt_ptr + p_state + p_kv, mask=m_kv, other=0.0)
    dS = tl.load(dckpt_ptr + p_state + p_kv, mask=m_kv, other=0.0)
    v = _rows_of(v_ptr, rows, m_t, r_v, m_v, V)
    dq += _mm_of_loaded(_rows_of(dy_ptr, rows, m_t, r_v, m_v, V), tl.trans(S), DOT)
    dk += _mm_of_loaded(v, tl.trans(dS), DOT)
    if DECAY > 0:
        last += tl.sum(S.to(tl.float32) * dS.to(tl.float32) * decay_last, axis=1)
    return dq, dk, last


@triton.jit
def _grads_of_k_block(
    i_k, qdq_all, kdk_all, last_all, q_ptr, k_ptr, v_ptr, lam_ptr, dy_ptr, ckpt_ptr,
    dckpt_ptr, chunk_table_ptr, scale, dq_ptr, dk_ptr, last_ptr, zckpt_ptr, dzckpt_ptr, dA,
    dy_col, rows, m_t, r_c, i_g, i_h, p_state, NB, H: tl.constexpr, K: tl.constexpr,
    V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr,
    DECAY: tl.constexpr, STRICT: tl.constexpr, DOT: tl.constexpr, PARALLEL: tl.constexpr,
    NORM: tl.constexpr, DLAM: tl.constexpr,
):
    """``chunk_grads_kernel``'s dq and dk on K block ``i_k`` (stored), and the running sums
    of q.dq, k.dk and S_next.dS that scalar decays' dlam needs, updated."""
    C: tl.constexpr = r_c.shape[0]
    r_k, m_k = _block(i_k, BK, K)
    m_tk = m_t[:, None] & m_k[None, :]
    q = _rows_of(q_ptr, rows, m_t, r_k, m_k, K)
    k = _rows_of(k_ptr, rows, m_t, r_k, m_k, K)
    if PARALLEL:    # earlier and later blocks, pair by pair, instead of S and dS
        dq, dk = _cross_block_grads(q_ptr, k_ptr, v_ptr, lam_ptr, dy_ptr,
                                    chunk_table_ptr, last_ptr, q.to(tl.float32), rows, m_t,
                                    r_c, r_k, m_k, i_k, i_h, NB, H, K, V, BV, NK, NV, DECAY,
                                    STRICT, DOT, DLAM)
        last = tl.zeros([BK], dtype=tl.float32)     # (no chunk states)
    else:
        k_factor, decay_last = _key_factor(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, H)
        q_factor, _ = _query_factor(lam_ptr, rows, m_t, r_k, m_k, K, DECAY, STRICT, H)
        dq = tl.zeros([C, BK], dtype=tl.float32)
        dk = tl.zeros([C, BK], dtype=tl.float32)
        last = tl.zeros([BK], dtype=tl.float32)
        UNROLL_V: tl.constexpr = NV if NV <= MAX_UNROLLED_V else 0
        for i_v in tl.static_range(UNROLL_V):
            dq, dk, last = _state_grads_of_v_block(i_k, i_v, dq, dk, last, decay_last, v_ptr,
                                                   dy_ptr, ckpt_ptr, dckpt_ptr, p_state, rows,
                                                   m_t, K, V, BK, BV, DECAY, DOT)
        for i_v in range(UNROLL_V, NV):
            dq, dk, last = _state_grads_of_v_block(i_k, i_v, dq, dk, last, decay_last, v_ptr,
                                                   dy_ptr, ckpt_ptr, dckpt_ptr, p_state, rows,
                                                   m_t, K, V, BK, BV, DECAY, DOT)
        if NORM:
            z = tl.load(zckpt_ptr + (i_g * H + i_h) * K + r_k, mask=m_k, other=0.0)
            dz = tl.load(dzckpt_ptr + (i_g * H + i_h) * K + r_k, mask=m_k, other=0.0)
            dq += dy_col[:, None] * z[None, :]
            dk += dz[None, :]
            if DECAY > 0:
                last += z * dz * _lane_decay(decay_last, DECAY)
        if DECAY > 0:
            # sum over V of S_next * dS, S_next = exp(b_last) S + (k exp(b_last -
            # b))^T v: its second part is sum over s of k_dec[s] * (v dS^T)[s],
            # which dk holds now
            last += tl.sum(k.to(tl.float32) * k_factor * dk, axis=0)
        dq = dq * q_factor
        dk = dk * k_factor
    if PARALLEL and DECAY == 1 and DLAM:    # the pairs with other blocks only
        qdq_all += tl.sum(q.to(tl.float32) * dq, axis=1)
        kdk_all += tl.sum(k.to(tl.float32) * dk, axis=1)
    p_tk = rows[:, None] * K + r_k[None, :]
    if DECAY == 2:  # the state parts; chunk_diag_grads_kernel adds the rest
        tl.store(dq_ptr + p_tk, dq.to(dq_ptr.dtype.element_ty), mask=m_tk)
        tl.store(dk_ptr + p_tk, dk.to(dk_ptr.dtype.element_ty), mask=m_tk)
        tl.store(last_ptr + (i_g * H + i_h) * K + r_k, last, mask=m_k)
    else:
        dq += _mm(dA, k, DOT)
        dk += _mm(tl.trans(dA), q, DOT)
        tl.store(dq_ptr + p_tk, (dq * scale).to(dq_ptr.dtype.element_ty), mask=m_tk)
        tl.store(dk_ptr + p_tk, (dk * scale).to(dk_ptr.dtype.element_ty), mask=m_tk)
    if DECAY == 1 and DLAM and not PARALLEL:
        qdq_all += tl.sum(q.to(tl.float32) * dq, axis=1)
        kdk_all += tl.sum(k.to(tl.float32) * dk, axis=1)
        last_all += last
    return qdq_all, kdk_all, last_all


@triton.jit
def chunk_grads_kernel(
    q_ptr, k_ptr, v_ptr, lam_ptr, dy_ptr, ckpt_ptr, dckpt_ptr, chunk_table_ptr, A_ptr, last_ptr,
    scale, dq_ptr, dk_ptr, dv_ptr, dlam_ptr, dycol_ptr, zckpt_ptr, dzckpt_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NK: tl.constexpr, NV: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr,
    STRICT: tl.constexpr, DOT: tl.constexpr, PARALLEL: tl.constexpr = False,
    STORE_DV: tl.constexpr = True, NORM: tl.constexpr = False, DLAM: tl.constexpr = True,
    NB=1,
):
    """Grid (chunks, heads): dq, dk, dv (unless not STORE_DV) and dlam of one chunk from its
    start state S and the gradient dS of its end state, every K and V block in one program
    (no atomics):
    dA = dy v^T; dv = A^T dy + k_dec dS per V block; dq = dy S^T exp(bq) + dA k and
    dk = v dS^T exp(b_last - b) + dA^T q per K block. Diagonal decays: this kernel stores
    dv, the state parts of dq and dk (unscaled), each lane's sum over V of S_next * dS
    (``last_ptr``) and dA in place of the scores it read (``A_ptr``);
    ``chunk_diag_grads_kernel`` adds the intra-chunk parts and the decay gradients. NORM:
    the normalizer's reads (a column of ones as the value) add their gradient ``dycol`` to
    every dA[t, s] of the row, dycol z^T to dq and the gradient of the chunk's end z
    (``dzckpt``) to every key row's dk. PARALLEL (no states: the pairs with other blocks
    of the sequence directly), scalar decays: ``last_ptr`` [chunks, H, NK, NB] receives the
    block pair sums of ``_cross_block_grads`` and dlam lacks the pairs from earlier to
    later blocks, which the host adds (``_blocks_crossing``)."""
    i_g, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    UNROLL_K: tl.constexpr = NK if NK <= MAX_UNROLLED_K else 0
    r_c = tl.arange(0, C)
    rows, m_t = _chunk(chunk_table_ptr, i_h, H, r_c)
    p_state = (i_g * H + i_h) * K * V
    p_A = ((i_g * C + r_c) * H + i_h)[:, None] * C + r_c[None, :]
    dA = tl.zeros([C, C], dtype=tl.float32)       # d score[t, s] = dy_t . v_s
    for i_v in tl.static_range(NV):
        r_v, m_v = _block(i_v, BV, V)
        dA += _mm(_rows_of(dy_ptr, rows, m_t, r_v, m_v, V),
                  tl.trans(_rows_of(v_ptr, rows, m_t, r_v, m_v, V)), DOT)
    dy_col = tl.zeros([C], dtype=tl.float32)
    if NORM:
        dy_col = tl.load(dycol_ptr + rows, mask=m_t, other=0.0)
        dA += dy_col[:, None]
    dA = tl.where(_causal(r_c, STRICT), dA, 0.0)
    in_block = tl.zeros([C], dtype=tl.float32)
    if DECAY == 2:      # scores from chunk_diag_scores_kernel
        A = tl.load(A_ptr + p_A, mask=m_t[:, None], other=0.0)
    else:
        A, mask = _chunk_scores(q_ptr, k_ptr, lam_ptr, rows, m_t, r_c, K, BK, NK, C, DECAY,
                                STRICT, DOT)
        if PARALLEL and DECAY == 1 and DLAM:    # (see the dlam below)
            in_block = _pairs_crossing(dA * A, STRICT)
        dA = dA * mask      # (once: the [C, C] mask is then dead)
    if STORE_DV:
        UNROLL_V: tl.constexpr = NV if NV <= MAX_UNROLLED_V else 0
        for i_v in tl.static_range(UNROLL_V):
            _dv_of_v_block(i_v, A, q_ptr, k_ptr, lam_ptr, dy_ptr, dckpt_ptr, chunk_table_ptr,
                           dv_ptr, scale, p_state, rows, m_t, r_c, i_h, H, K, V, BK, BV, NK,
                           DECAY, STRICT, DOT, PARALLEL)
        for i_v in range(UNROLL_V, NV):
            _dv_of_v_block(i_v, A, q_ptr, k_ptr, lam_ptr, dy_ptr, dckpt_ptr, chunk_table_ptr,
                           dv_ptr, scale, p_state, rows, m_t, r_c, i_h, H, K, V, BK, BV, NK,
                           DECAY, STRICT, DOT, PARALLEL)
    if DECAY == 2:
        # every thread has used its scores (the dots above): dA may take their place
        tl.debug_barrier()
        tl.store(A_ptr + p_A, dA.to(A_ptr.dtype.element_ty))
    # scalar decays sum q.dq, k.dk and S_next.dS over every K block before dlam
    qdq_all = tl.zeros([C], dtype=tl.float32)
    kdk_all = tl.zeros([C], dtype=tl.float32)
    last_all = tl.zeros([BK], dtype=tl.float32)
    for i_k in tl.static_range(UNROLL_K):
        qdq_all, kdk_all, last_all = _grads_of_k_block(
            i_k, qdq_all, kdk_all, last_all, q_ptr, k_ptr, v_ptr, lam_ptr, dy_ptr, ckpt_ptr,
            dckpt_ptr, chunk_table_ptr, scale, dq_ptr, dk_ptr, last_ptr, zckpt_ptr, dzckpt_ptr,
            dA, dy_col, rows, m_t, r_c, i_g, i_h, p_state, NB, H, K, V, BK, BV, NK, NV, DECAY,
            STRICT, DOT, PARALLEL, NORM, DLAM)
    for i_k in range(UNROLL_K, NK):
        qdq_all, kdk_all, last_all = _grads_of_k_block(
            i_k, qdq_all, kdk_all, last_all, q_ptr, k_ptr, v_ptr, lam_ptr, dy_ptr, ckpt_ptr,
            dckpt_ptr, chunk_table_ptr, scale, dq_ptr, dk_ptr, last_ptr, zckpt_ptr, dzckpt_ptr,
            dA, dy_col, rows, m_t, r_c, i_g, i_h, p_state, NB, H, K, V, BK, BV, NK, NV, DECAY,
            STRICT, DOT, PARALLEL, NORM, DLAM)
    if PARALLEL and DECAY == 1 and DLAM:
        # lam_j enters every pair (t, s) with s < j <= t (s < j < t when STRICT). Summed as
        # parts that are each a sum of distinct pairs (q.dq over t >= j less k.dk over
        # s >= j cancels all the pairs after j: 2e-4 errors in fp32 in Mamba-2's dA at
        # T = 300): the block's own pairs, those from earlier blocks to t >= j (q.dq from
        # them), from s < j to later blocks (k.dk to them); the host adds those from earlier
        # to later blocks (_blocks_crossing)
        from_q = tl.cumsum(qdq_all, axis=0, reverse=True)
        if STRICT:
            from_q -= qdq_all
        tl.store(dlam_ptr + rows,
                 (in_block + from_q + tl.cumsum(kdk_all, axis=0) - kdk_all) * scale, mask=m_t)
    elif DECAY == 1 and DLAM:
        tl.store(dlam_ptr + rows,
                 _dlam(qdq_all, kdk_all, tl.sum(last_all, axis=0), STRICT) * scale,
                 mask=m_t)


@triton.jit
def _unit_lower_inverse_transposed(A, C: tl.constexpr):
    """(I + A)^-T for a strictly lower-triangular [C, C] A, by forward substitution in fp32
    on the columns: column t of the transposed inverse Y is e_t - sum_{s < t} A[t, s]
    Y[:, s]. Each step's sum runs along a tile's row (within a warp), and the row of A it
    needs does not depend on earlier steps; the row form sums down the columns (across
    warps) on the critical path."""
    r_c = tl.arange(0, C)
    Y = (r_c[:, None] == r_c[None, :]).to(tl.float32)
    for t in range(1, C):
        a_t = tl.sum(tl.where((r_c == t)[:, None], A, 0.0), axis=0)
        Y = tl.where((r_c == t)[None, :], Y - tl.sum(Y * a_t[None, :], axis=1)[:, None], Y)
    return Y


@triton.jit
def _pairs_crossing(P, STRICT: tl.constexpr):
    """For a block's [C, C] matrix of d loss / d (b_t - b_s) terms (zero unless s <= t): for
    every j, the sum over its pairs with s < j <= t (s < j < t when STRICT), which lam_j
    enters."""
    r_c = tl.arange(0, P.shape[0])
    from_j = tl.cumsum(P, axis=0, reverse=True)   # [j, s]: over t >= j
    if STRICT:
        from_j -= P                                 # over t > j
    return tl.sum(tl.where(r_c[None, :] < r_c[:, None], from_j, 0.0), axis=1)


@triton.jit
def _unit_lower_inverse_diagonal_blocks(A, C: tl.constexpr, DOT: tl.constexpr):
    """(I + A)^-1 for a strictly lower-triangular [C, C] A. First the inverses D_b of the
    16 x 16 diagonal blocks I + A_b, all at once: forward substitution on their columns in
    a [C / 16, 16, 16] tile, 15 steps for any C, each on a 16th of the [C, C] tile (the row
    of A a step needs does not depend on earlier steps); then ``_merge_diagonal_blocks``."""
    BC: tl.constexpr = 16
    NB: tl.constexpr = C // BC
    r_c = tl.arange(0, C)
    same = (r_c[:, None] // BC) == (r_c[None, :] // BC)
    # [block b, row i, block c, column j]: zero unless c == b, so the sum over c is block b
    A_d = tl.sum(tl.reshape(tl.where(same, A, 0.0), [NB, BC, NB, BC]), axis=2)
    i3 = tl.arange(0, BC)[None, :, None]
    j3 = tl.arange(0, BC)[None, None, :]
    Y = tl.where(i3 == j3, 1.0, 0.0) + tl.zeros([NB, BC, BC], dtype=tl.float32)
    for t in range(1, BC):      # Y[b] = D_b^T, column t = row t of D_b
        a_t = tl.sum(tl.where(i3 == t, A_d, 0.0), axis=1)        # [NB, BC]: row t of A_b
        Y = tl.where(j3 == t, Y - tl.sum(Y * a_t[:, None, :], axis=2)[:, :, None], Y)
    b4 = tl.arange(0, NB)[:, None, None, None]
    c4 = tl.arange(0, NB)[None, None, :, None]
    D = tl.reshape(tl.where(b4 == c4, tl.permute(Y, (0, 2, 1))[:, :, None, :], 0.0), [C, C])
    return _merge_diagonal_blocks(D, A, same, C, DOT)


@triton.jit
def _unit_lower_inverse_block_columns(A, C: tl.constexpr, DOT: tl.constexpr):
    """(I + A)^-1 for a strictly lower-triangular [C, C] A: the inverses of the 16 x 16
    diagonal blocks by forward substitution on their columns, column t of every block in
    one step on the [C, C] tile (15 steps for any C, against C - 1 by whole columns), then
    ``_merge_diagonal_blocks``. Only 2-d tiles, the operations of the by-columns inverse:
    no reshapes. With Y the block-diagonal transposed inverse so far and a the rows t of
    every block of A, each on its own block's lanes, sum_s Y[i, s] a[s] sums over i's
    block only (Y is zero elsewhere): the update of column t of i's block, at row i."""
    BC: tl.constexpr = 16
    r_c = tl.arange(0, C)
    same = (r_c[:, None] // BC) == (r_c[None, :] // BC)
    A_d = tl.where(same, A, 0.0)
    eye = (r_c[:, None] == r_c[None, :]).to(tl.float32)
    Y = eye
    for t in range(1, BC):
        column = (r_c % BC) == t
        a_t = tl.sum(tl.where(column[:, None], A_d, 0.0), axis=0)
        Y = tl.where(column[None, :] & same, eye - tl.sum(Y * a_t[None, :], axis=1)[:, None],
                     Y)
    return _merge_diagonal_blocks(tl.trans(Y), A, same, C, DOT)


@triton.jit
def _unit_lower_inverse_through_memory(A, buf_ptr, H: tl.constexpr, C: tl.constexpr,
                                       DOT: tl.constexpr):
    """(I + A)^-1 for a strictly lower-triangular [C, C] A, through this program's [C, C]
    block of ``buf_ptr`` ([chunks * C, H, C], the L^-1 buffer). A is written there and the
    16 x 16 diagonal blocks' inverses are made at once in a [C / 16, 16, 16] tile by
    forward substitution on their columns, each step's rows of A read back from memory:
    15 steps for any C, with no barrier or shared memory in them (a row taken out of a
    register tile is a reduction across warps, and that made the other inverses' steps
    cost 3-6 barriers each on sm_90). Their blocks are written back over A's and read as a
    [C, C] tile (no reshapes), then ``_merge_diagonal_blocks``. The barriers order this
    program's writes and reads of the buffer (the caller may write L^-1 there after)."""
    BC: tl.constexpr = 16
    NB: tl.constexpr = C // BC
    RS: tl.constexpr = H * C      # the buffer's row stride
    r_c = tl.arange(0, C)
    block = buf_ptr + (tl.program_id(0).to(tl.int64) * C * H + tl.program_id(1)) * C
    p_cc = r_c[:, None] * RS + r_c[None, :]
    tl.store(block + p_cc, A)
    tl.debug_barrier()
    b3 = tl.arange(0, NB)[:, None, None] * BC
    i3 = tl.arange(0, BC)[None, :, None]
    j3 = tl.arange(0, BC)[None, None, :]
    Y = tl.where(i3 == j3, 1.0, 0.0) + tl.zeros([NB, BC, BC], dtype=tl.float32)
    first_rows = block + b3 * RS + b3 + j3 + i3 * 0     # [b, i, j]: A[b * 16, b * 16 + j]
    for t in range(1, BC):      # Y[b] = D_b^T, column t = row t of D_b
        Y = tl.where(j3 == t, Y - tl.sum(Y * tl.load(first_rows + t * RS), axis=2)[:, :, None],
                     Y)
    tl.debug_barrier()
    tl.store(block + (b3 + j3) * RS + b3 + i3, Y)       # D_b[j, i] = Y[b, i, j]
    tl.debug_barrier()
    same = (r_c[:, None] // BC) == (r_c[None, :] // BC)
    L_inv = _merge_diagonal_blocks(tl.load(block + p_cc, mask=same, other=0.0), A, same, C,
                                   DOT)
    tl.debug_barrier()
    return L_inv


@triton.jit
def _merge_diagonal_blocks(D, A, same, C: tl.constexpr, DOT: tl.constexpr):
    """(I + A)^-1 from D, the inverse of I plus A's 16 x 16 diagonal blocks (``same``: the
    pairs in one block). With A' = A without its diagonal blocks and N = D A' (strictly
    block-lower, N^(C/16) = 0), I + A = D^-1 (I + N), so (I + A)^-1 = (I - N + N^2 - ...) D,
    by Horner's rule: X <- D - N X, C / 16 - 1 times. The dots run in tf32 where the
    kernel's run in tf32 or bf16 (2e-4 to 5e-4 relative error in the inverse, as in the
    kernel's tf32 dots; tf32x3 spills 0.9 KB per thread on sm_90 even alone), else in
    tf32x3 (about fp32's accuracy, 1e-7)."""
    MERGE: tl.constexpr = 1 if DOT <= 1 else 3
    N = _mm(D, tl.where(same, 0.0, A), MERGE)
    X = D
    for _ in tl.static_range(C // 16 - 1):
        X = D - _mm(N, X, MERGE)
    return X


@triton.jit
def _row_sums_of_pairs(P):
    """For a [C, C] matrix of d loss / d (b_t - b_s) terms: the part of d loss / d b_t,
    sum_s P[t, s] - sum_s P[s, t]."""
    return tl.sum(P, axis=1) - tl.sum(P, axis=0)


@triton.jit
def _wy_rows(beta_ptr, chunk_table_ptr, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
             C: tl.constexpr, LOW_RANK: tl.constexpr):
    """This WY program's chunk: its rows and their mask, the lanes of K, the offsets of its
    [C, C] block of a chunk-product buffer ([chunks * C, H, C]) and beta (-1 for LOW_RANK)."""
    i_g, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    r_c = tl.arange(0, C)
    rows, m_t = _chunk(chunk_table_ptr, i_h, H, r_c)
    r_k, m_k = _block(0, BK, K)
    p_cc = ((i_g * C + r_c) * H + i_h)[:, None] * C + r_c[None, :]
    if LOW_RANK:
        beta = tl.full([C], -1.0, tl.float32)
    else:
        beta = tl.load(beta_ptr + rows, mask=m_t, other=0.0).to(tl.float32)
    return rows, m_t, r_k, m_k, p_cc, beta


@triton.jit
def _wy_chunk(k_ptr, beta_ptr, lam_ptr, kk_ptr, chunk_table_ptr, H: tl.constexpr,
              K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr,
              DOT: tl.constexpr, LOW_RANK: tl.constexpr):
    """What the delta rule's WY form of this program's chunk is made from: its rows and
    their mask, the lanes of K, the offsets of its [C, C] block of a chunk-product buffer
    ([chunks * C, H, C]), beta, and the strictly lower A = beta_t KK[t, s] with L = I + A,
    KK[t, s] = k_t . k_s exp(b_t - b_s) (diagonal decays: from ``kk_ptr``). LOW_RANK
    (RWKV-7, the state read along w and written along x): ``k_ptr`` is w, KK the products
    w_t . x_s exp(bq_t - b_s) with bq the decay before the token, and beta = -1 (A = -WX)."""
    rows, m_t, r_k, m_k, p_cc, beta = _wy_rows(beta_ptr, chunk_table_ptr, H, K, BK, C,
                                               LOW_RANK)
    r_c = tl.arange(0, C)
    if DECAY == 2:
        KK = tl.load(kk_ptr + p_cc).to(tl.float32)
    else:
        k = _rows_of(k_ptr, rows, m_t, r_k, m_k, K).to(tl.float32)
        KK = _mm(k, tl.trans(k), DOT)
        if DECAY == 1:
            b, _, _ = _decays(lam_ptr, rows, m_t, r_k, m_k, K, 1, False)
            KK = KK * tl.exp(tl.minimum(b[:, None] - b[None, :], 0.0))
    A = tl.where(r_c[:, None] > r_c[None, :], KK * beta[:, None], 0.0)
    return rows, m_t, r_k, m_k, p_cc, beta, A


@triton.jit
def _wy_key_decay(lam_ptr, rows, m_t, r_k, m_k, H: tl.constexpr, K: tl.constexpr,
                  DECAY: tl.constexpr, LOW_RANK: tl.constexpr):
    """exp(b), what the WY form scales each key row by: [C, 1] for scalar decays, [C, BK]
    per lane for diagonal ones (LOW_RANK: the decay before the token, bq), ones without
    a decay."""
    if DECAY == 2:
        _, bq, _ = _decays(lam_ptr, rows, m_t, r_k, m_k, K, 2, LOW_RANK, H)
        return tl.exp(bq)
    elif DECAY == 1:
        b, _, _ = _decays(lam_ptr, rows, m_t, r_k, m_k, K, 1, False)
        return tl.exp(b)[:, None]
    else:
        return tl.full([rows.shape[0], 1], 1.0, tl.float32)


@triton.jit
def _wy_keys(k_ptr, lam_ptr, rows, m_t, r_k, m_k, beta, H: tl.constexpr, K: tl.constexpr,
             DECAY: tl.constexpr, LOW_RANK: tl.constexpr):
    """R_w = beta exp(b) k, fp32 [C, BK], whose L^-1 image is the WY form's W (LOW_RANK:
    w exp(bq) with beta = -1), as ``_wy_chunk`` makes it."""
    k = _rows_of(k_ptr, rows, m_t, r_k, m_k, K).to(tl.float32)
    return k * _wy_key_decay(lam_ptr, rows, m_t, r_k, m_k, H, K, DECAY, LOW_RANK) \
        * beta[:, None]


@triton.jit
def _wy_of_v_block(i_v, L_inv, W, beta, rows, m_t, p_cc, v_ptr, wk_ptr, ckpt_ptr, u_ptr,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, DOT: tl.constexpr, LOW_RANK: tl.constexpr,
                   FROM_STATES: tl.constexpr):
    """``delta_wy_kernel``'s updates on V block ``i_v``: U0 = L^-1 (beta V) (LOW_RANK:
    L^-1 (WK V)), or u = U0 - W S from the chunk's start state (FROM_STATES), stored."""
    r_v, m_v = _block(i_v, BV, V)
    v = _rows_of(v_ptr, rows, m_t, r_v, m_v, V).to(tl.float32)
    if LOW_RANK:
        v = _mm(tl.load(wk_ptr + p_cc), v, DOT)
    else:
        v = v * beta[:, None]
    U = _mm(L_inv, v, DOT)
    if FROM_STATES:
        _, _, _, _, m_kv, p_kv = _tile(0, i_v, K, V, BK, BV)
        i_state = tl.program_id(0).to(tl.int64) * H + tl.program_id(1)
        U -= _mm(W, tl.load(ckpt_ptr + i_state * K * V + p_kv, mask=m_kv, other=0.0), DOT)
    tl.store(u_ptr + rows[:, None] * V + r_v[None, :], U, mask=m_t[:, None] & m_v[None, :])


@triton.jit
def delta_wy_kernel(
    k_ptr, v_ptr, beta_ptr, lam_ptr, kk_ptr, w_ptr, u_ptr, inv_ptr, chunk_table_ptr, wk_ptr,
    ckpt_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NV: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr, DOT: tl.constexpr,
    STORE_INVERSE: tl.constexpr, LOW_RANK: tl.constexpr = False,
    FROM_STATES: tl.constexpr = False, INVERSE: tl.constexpr = 0,
    LOAD_INVERSE: tl.constexpr = False,
):
    """Grid (chunks, heads), every chunk at once: the delta rule's WY form. Within a chunk
    the updates u_t = beta_t (v_t - S_{t-1}^T k_t) solve (I + A) U = beta (V - exp(b) K S)
    for the chunk's start state S, so U = U0 - W S with W = L^-1 (beta exp(b) K) and
    U0 = L^-1 (beta V), L = I + A unit lower triangular, inverted in fp32 (INVERSE below).
    Stores W (``w_ptr``, [T*, H, K]), U0 (``u_ptr``, [T*, H, V]; the states kernel turns it
    into U) and, for the backward, L^-1 (``inv_ptr``, [chunks * C, H, C]).
    LOW_RANK (RWKV-7, ``_wy_chunk``): the reads u_t = w_t^T S_{t-1} solve (I - WX) U =
    (w exp(bq)) S + WK V, so W = -L^-1 (w exp(bq)) and U0 = L^-1 (WK V), WK[t, s] =
    w_t . k_s exp(bq_t - b_s) (s < t, ``wk_ptr``). FROM_STATES (the backward, which keeps
    only the chunk start states): stores u = U0 - W S from the states in ``ckpt`` instead of
    U0, so nothing else of the forward need be kept. INVERSE: 0 by columns
    (``_unit_lower_inverse_transposed``), 1 by diagonal blocks at once in a 3-d tile
    (``_unit_lower_inverse_diagonal_blocks``), 2 by the diagonal blocks' columns on the
    [C, C] tile (``_unit_lower_inverse_block_columns``), 3 by diagonal blocks whose rows are
    read back from ``inv_ptr`` (``_unit_lower_inverse_through_memory``: the buffer is
    needed even when L^-1 is not stored); 1-3 not yet timed. LOAD_INVERSE
    (the backward, after a forward that stored it): L^-1 read from ``inv_ptr``; neither
    the products nor the inverse are made again."""
    if LOAD_INVERSE:
        rows, m_t, r_k, m_k, p_cc, beta = _wy_rows(beta_ptr, chunk_table_ptr, H, K, BK, C,
                                                   LOW_RANK)
        L_inv = tl.load(inv_ptr + p_cc)
    else:
        rows, m_t, r_k, m_k, p_cc, beta, A = _wy_chunk(
            k_ptr, beta_ptr, lam_ptr, kk_ptr, chunk_table_ptr, H, K, BK, C, DECAY, DOT,
            LOW_RANK)
        if INVERSE == 1:
            L_inv = _unit_lower_inverse_diagonal_blocks(A, C, DOT)
        elif INVERSE == 2:
            L_inv = _unit_lower_inverse_block_columns(A, C, DOT)
        elif INVERSE == 3:
            L_inv = _unit_lower_inverse_through_memory(A, inv_ptr, H, C, DOT)
        else:
            L_inv = tl.trans(_unit_lower_inverse_transposed(A, C))
        if STORE_INVERSE:
            tl.store(inv_ptr + p_cc, L_inv)
    # the keys read again rather than held through the inverse (register pressure)
    W = _mm(L_inv, _wy_keys(k_ptr, lam_ptr, rows, m_t, r_k, m_k, beta, H, K, DECAY, LOW_RANK),
            DOT)
    tl.store(w_ptr + rows[:, None] * K + r_k[None, :], W, mask=m_t[:, None] & m_k[None, :])
    UNROLL_V: tl.constexpr = NV if NV <= MAX_UNROLLED_V else 0
    for i_v in tl.static_range(UNROLL_V):
        _wy_of_v_block(i_v, L_inv, W, beta, rows, m_t, p_cc, v_ptr, wk_ptr, ckpt_ptr, u_ptr,
                       H, K, V, BK, BV, DOT, LOW_RANK, FROM_STATES)
    for i_v in range(UNROLL_V, NV):
        _wy_of_v_block(i_v, L_inv, W, beta, rows, m_t, p_cc, v_ptr, wk_ptr, ckpt_ptr, u_ptr,
                       H, K, V, BK, BV, DOT, LOW_RANK, FROM_STATES)


@triton.jit
def _wy_bwd_of_v_block(i_v, dRR, dbeta, L_inv, beta, rows, m_t, v_ptr, du_ptr, dv_ptr,
                       V: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr):
    """``delta_wy_bwd_kernel`` through U0 = L^-1 (beta V) on V block ``i_v``: dR_u = L^-T dU,
    dv = beta dR_u (stored); dR_u (beta V)^T (dA's term but for the final L^-T) and dbeta
    gain this block's terms."""
    r_v, m_v = _block(i_v, BV, V)
    m_tv = m_t[:, None] & m_v[None, :]
    dU = tl.load(du_ptr + rows[:, None] * V + r_v[None, :], mask=m_tv, other=0.0)
    v = _rows_of(v_ptr, rows, m_t, r_v, m_v, V).to(tl.float32)
    dR_u = _mm(tl.trans(L_inv), dU, DOT)
    dRR += _mm(dR_u, tl.trans(v * beta[:, None]), DOT)
    dbeta += tl.sum(dR_u * v, axis=1)
    tl.store(dv_ptr + rows[:, None] * V + r_v[None, :],
             (dR_u * beta[:, None]).to(dv_ptr.dtype.element_ty), mask=m_tv)
    return dRR, dbeta


@triton.jit
def _wy_dw_of_v_block(i_k, i_v, dW, rows, m_t, i_state, du_ptr, ckpt_ptr, K: tl.constexpr,
                      V: tl.constexpr, BKW: tl.constexpr, BV: tl.constexpr,
                      DOT: tl.constexpr):
    """K block ``i_k`` of dW = -dU S^T with V block ``i_v``'s terms added."""
    _, r_v, _, m_v, m_kv, p_kv = _tile(i_k, i_v, K, V, BKW, BV)
    S = tl.load(ckpt_ptr + i_state * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    dU = tl.load(du_ptr + rows[:, None] * V + r_v[None, :],
                 mask=m_t[:, None] & m_v[None, :], other=0.0)
    return dW - _mm(dU, tl.trans(S), DOT)


@triton.jit
def delta_wy_bwd_kernel(
    k_ptr, v_ptr, beta_ptr, lam_ptr, kk_ptr, inv_ptr, du_ptr, ckpt_ptr, chunk_table_ptr,
    dk_ptr, dv_ptr, dbeta_ptr, dlam_ptr, dkk_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NV: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr, DOT: tl.constexpr,
    BKW: tl.constexpr = 64,
):
    """Grid (chunks, heads): back through a chunk's WY form (``delta_wy_kernel``) given dU,
    the gradient of its updates (``chunk_dstates_kernel``), and its start state S (ckpt).
    With U = U0 - W S and [W, U0] = L^-1 [R_w, beta V], R_w = beta exp(b) K:
    dW = -dU S^T, [dR_w, dR_u] = L^-T [dW, dU], dA = -(dR_w W^T + dR_u U0^T) below the
    diagonal; dv = beta dR_u and dbeta are stored, dk and dlam (the parts through q's
    readout and the state, from ``chunk_grads_kernel``) gain the key's terms through R_w and
    through A = beta KK. Diagonal decays: d loss / d KK goes to ``dkk_ptr`` for
    ``chunk_diag_grads_kernel`` instead.
    K is walked in blocks of BKW lanes, so that no [C, K] tile is live across the kernel
    (with all of K at once, dW, W, k and dk spilled 2-2.4 KB per thread on sm_90): first
    the V blocks (dv, and dA through U0), then each K block (its dW from the V blocks, dR_w,
    dA through W, dk through R_w), then, once dA is whole, each K block's dk through KK.
    W's blocks are made again here (L^-1 R_w) rather than read, so that the backward need
    not keep W past the state gradients (peak memory)."""
    i_g, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    rows, m_t, _, _, p_cc, beta = _wy_rows(beta_ptr, chunk_table_ptr, H, K, BK, C, False)
    L_inv = tl.load(inv_ptr + p_cc)
    i_state = i_g * H + i_h
    # dA = -(dR_w R_w^T + dR_u (beta V)^T) L^-T: the sum over the V and K blocks first, one
    # product with L^-T at the end (not one per block), from loaded tiles only: no
    # transpose of a dot's result (fla #640: that miscompiles on Hopper with Triton 3.4 to
    # 3.7.0)
    dRR = tl.zeros([C, C], dtype=tl.float32)
    dbeta = tl.zeros([C], dtype=tl.float32)
    UNROLL_V: tl.constexpr = NV if NV <= MAX_UNROLLED_V else 0
    for i_v in tl.static_range(UNROLL_V):
        dRR, dbeta = _wy_bwd_of_v_block(i_v, dRR, dbeta, L_inv, beta, rows, m_t, v_ptr,
                                        du_ptr, dv_ptr, V, BV, DOT)
    for i_v in range(UNROLL_V, NV):
        dRR, dbeta = _wy_bwd_of_v_block(i_v, dRR, dbeta, L_inv, beta, rows, m_t, v_ptr,
                                        du_ptr, dv_ptr, V, BV, DOT)
    NKW: tl.constexpr = (K + BKW - 1) // BKW
    db_w = tl.zeros([C], dtype=tl.float32)      # scalar decays: d / d b_t through R_w
    for i_k in range(NKW):
        r_k, m_k = _block(i_k, BKW, K)
        dW = tl.zeros([C, BKW], dtype=tl.float32)
        for i_v in tl.static_range(UNROLL_V):
            dW = _wy_dw_of_v_block(i_k, i_v, dW, rows, m_t, i_state, du_ptr, ckpt_ptr, K, V,
                                   BKW, BV, DOT)
        for i_v in range(UNROLL_V, NV):
            dW = _wy_dw_of_v_block(i_k, i_v, dW, rows, m_t, i_state, du_ptr, ckpt_ptr, K, V,
                                   BKW, BV, DOT)
        dR_w = _mm(tl.trans(L_inv), dW, DOT)
        m_tk = m_t[:, None] & m_k[None, :]
        p_tk = rows[:, None] * K + r_k[None, :]
        k = _rows_of(k_ptr, rows, m_t, r_k, m_k, K).to(tl.float32)
        e_b = _wy_key_decay(lam_ptr, rows, m_t, r_k, m_k, H, K, DECAY, False)
        R_w = k * e_b * beta[:, None]
        dRR += _mm(dR_w, tl.trans(R_w), DOT)
        dbeta += tl.sum(dR_w * k * e_b, axis=1)
        tl.store(dk_ptr + p_tk, tl.load(dk_ptr + p_tk, mask=m_tk, other=0.0)
                 + dR_w * e_b * beta[:, None], mask=m_tk)
        if DECAY == 2:
            db = tl.where(m_tk, dR_w * R_w, 0.0)      # d / d b of beta exp(b) k, per lane
            dlam = (tl.load(dlam_ptr + p_tk, mask=m_tk, other=0.0)
                    + tl.sum(db, axis=0)[None, :] - tl.cumsum(db, axis=0) + db)
            tl.store(dlam_ptr + p_tk, dlam, mask=m_tk)
        else:
            db_w += tl.sum(dR_w * R_w, axis=1)
    earlier = tl.arange(0, C)[:, None] > tl.arange(0, C)[None, :]
    dA = tl.where(earlier, -_mm(dRR, tl.trans(L_inv), DOT), 0.0)
    G = dA * beta[:, None]                      # d loss / d KK[t, s], s < t
    if DECAY == 2:      # KK's own gradients follow in chunk_diag_grads_kernel
        KK = tl.load(kk_ptr + p_cc).to(tl.float32)
        tl.debug_barrier()  # (dkk may be KK's buffer: every thread has read it)
        tl.store(dkk_ptr + p_cc, G)
    else:               # KK = k k^T (times the scalar pair decays), summed over K blocks
        dKK = G
        if DECAY == 1:
            b, _, _ = _decays(lam_ptr, rows, m_t, rows, m_t, K, 1, False)
            pair = tl.exp(tl.minimum(b[:, None] - b[None, :], 0.0))
            dKK = G * pair
        KK = tl.zeros([C, C], dtype=tl.float32)
        tl.debug_barrier()  # dk, stored above by other threads of this program, read again
        for i_k in range(NKW):
            r_k, m_k = _block(i_k, BKW, K)
            m_tk = m_t[:, None] & m_k[None, :]
            p_tk = rows[:, None] * K + r_k[None, :]
            k = _rows_of(k_ptr, rows, m_t, r_k, m_k, K).to(tl.float32)
            KK += _mm(k, tl.trans(k), DOT)
            tl.store(dk_ptr + p_tk, tl.load(dk_ptr + p_tk, mask=m_tk, other=0.0)
                     + _mm(dKK, k, DOT) + _mm(tl.trans(dKK), k, DOT), mask=m_tk)
        if DECAY == 1:
            KK = KK * pair
    dbeta += tl.sum(dA * KK, axis=1)
    tl.store(dbeta_ptr + rows, dbeta, mask=m_t)
    if DECAY == 1:      # d / d b_t of the pairs' exp(b_t - b_s) and of R_w's exp(b_t)
        db = tl.where(m_t, _row_sums_of_pairs(dA * tl.where(earlier, KK * beta[:, None], 0.0))
                      + db_w, 0.0)
        dlam = (tl.load(dlam_ptr + rows, mask=m_t, other=0.0)
                + tl.sum(db, axis=0) - tl.cumsum(db, axis=0) + db)
        tl.store(dlam_ptr + rows, dlam, mask=m_t)


@triton.jit
def _low_rank_chunk(chunk_table_ptr, lam_ptr, i_k, H: tl.constexpr, K: tl.constexpr,
                    BK: tl.constexpr, C: tl.constexpr):
    """A low-rank backward program's chunk: its rows and mask, K block ``i_k``'s lanes, the
    [C, BK]
    tiles' mask and offsets, the chunk's [C, C] block of a product buffer, the offset of its
    start state, and the cumulative log decays b, bq (before the token) and b_last."""
    i_g, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    r_c = tl.arange(0, C)
    rows, m_t = _chunk(chunk_table_ptr, i_h, H, r_c)
    r_k, m_k = _block(i_k, BK, K)
    b, bq, b_last = _decays(lam_ptr, rows, m_t, r_k, m_k, K, 2, True, H)
    return (rows, m_t, r_k, m_k, m_t[:, None] & m_k[None, :], rows[:, None] * K + r_k[None, :],
            ((i_g * C + r_c) * H + i_h)[:, None] * C + r_c[None, :], i_g * H + i_h, b, bq,
            b_last)


@triton.jit
def low_rank_state_grads_kernel(
    q_ptr, k_ptr, v_ptr, x_ptr, lam_ptr, dy_ptr, ckpt_ptr, dckpt_ptr, wy_ptr, u_ptr, du_ptr,
    inv_ptr, chunk_table_ptr, dq_ptr, dk_ptr, dw_ptr, dx_ptr, last_ptr, dwx_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NV: tl.constexpr, C: tl.constexpr, DOT: tl.constexpr,
):
    """Grid (chunks, heads, K blocks), the diagonal-plus-low-rank transition (RWKV-7), first
    of two backward kernels: the gradients that sum over V on the K side. From the forward: the
    start state S (ckpt), u = U0 - W S (``u_ptr``), W = -L^-1 (w exp(bq)) (``wy_ptr``) and
    L^-1; from ``chunk_dstates_kernel``: the end state's gradient dS (dckpt) and dU. With
    y = (q exp(b)) S + QX U + QK V and S' = exp(b_last) S + (x exp(b_last - b))^T U +
    (k exp(b_last - b))^T V: stores the parts of dq, dx and dk through the state, dw (through
    w exp(bq) in U = L^-1 (w exp(bq)) S + ...), each lane's b_last term (``last``) and
    dR W^T (dR = L^-T dW, the solve's share of d loss / d A, summed over the K blocks into
    the zeroed ``dwx_ptr``, which ``low_rank_pair_grads_kernel`` completes)."""
    i_k = tl.program_id(2)
    (rows, m_t, r_k, m_k, m_tk, p_tk, p_cc, i_state, b, bq, b_last) = _low_rank_chunk(
        chunk_table_ptr, lam_ptr, i_k, H, K, BK, C)
    e_key = tl.exp(b_last[None, :] - b)
    dq_dec = tl.zeros([C, BK], dtype=tl.float32)
    dx_dec = tl.zeros([C, BK], dtype=tl.float32)
    dk_dec = tl.zeros([C, BK], dtype=tl.float32)
    dW = tl.zeros([C, BK], dtype=tl.float32)
    last = tl.zeros([BK], dtype=tl.float32)
    for i_v in tl.static_range(NV):
        r_k, r_v, m_k, m_v, m_kv, p_kv = _tile(i_k, i_v, K, V, BK, BV)
        m_tv = m_t[:, None] & m_v[None, :]
        p_tv = rows[:, None] * V + r_v[None, :]
        S = tl.load(ckpt_ptr + i_state * K * V + p_kv, mask=m_kv, other=0.0)
        dS = tl.load(dckpt_ptr + i_state * K * V + p_kv, mask=m_kv, other=0.0)
        U = tl.load(u_ptr + p_tv, mask=m_tv, other=0.0)
        dq_dec += _mm_of_loaded(tl.load(dy_ptr + p_tv, mask=m_tv, other=0.0), tl.trans(S), DOT)
        dx_dec += _mm_of_loaded(U, tl.trans(dS), DOT)
        dk_dec += _mm_of_loaded(tl.load(v_ptr + p_tv, mask=m_tv, other=0.0), tl.trans(dS),
                                DOT)
        dW -= _mm(tl.load(du_ptr + p_tv, mask=m_tv, other=0.0), tl.trans(S), DOT)
        last += tl.sum(S.to(tl.float32) * dS.to(tl.float32), axis=1)
    dR = _mm(tl.trans(tl.load(inv_ptr + p_cc)), dW, DOT)      # d (-w exp(bq))
    tl.atomic_add(dwx_ptr + p_cc,
                  _mm(dR, tl.trans(tl.load(wy_ptr + p_tk, mask=m_tk, other=0.0)), DOT))
    tl.store(dq_ptr + p_tk, dq_dec * tl.exp(b), mask=m_tk)
    tl.store(dx_ptr + p_tk, dx_dec * e_key, mask=m_tk)
    tl.store(dk_ptr + p_tk, dk_dec * e_key, mask=m_tk)
    tl.store(dw_ptr + p_tk, -dR * tl.exp(bq), mask=m_tk)
    x = _rows_of(x_ptr, rows, m_t, r_k, m_k, K).to(tl.float32)
    k = _rows_of(k_ptr, rows, m_t, r_k, m_k, K).to(tl.float32)
    last = (tl.sum(tl.where(m_tk, (dx_dec * x + dk_dec * k) * e_key, 0.0), axis=0)
            + tl.exp(b_last) * last)
    tl.store(last_ptr + i_state * K + r_k, last, mask=m_k)


@triton.jit
def low_rank_pair_grads_kernel(
    k_ptr, v_ptr, lam_ptr, dy_ptr, dckpt_ptr, u_ptr, du_ptr, inv_ptr, chunk_table_ptr,
    qk_ptr, wk_ptr, dqx_ptr, dqk_ptr, dwx_ptr, dwk_ptr, dv_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NV: tl.constexpr, C: tl.constexpr, DOT: tl.constexpr,
):
    """Grid (chunks, heads), RWKV-7's second backward kernel (after
    ``low_rank_state_grads_kernel``): the gradients of the four decayed products QX, QK, WX
    and WK (``dqx``, ``dqk``, ``dwx``, ``dwk``, for ``chunk_diag_grads_kernel``) and dv.
    With dX = L^-T dU (the gradient of WK V) and U0 = L^-1 (WK V): dQX = dy U^T,
    dQK = dy V^T (s <= t), dWX = dR W^T + dX U0^T, dWK = dX V^T (s < t),
    dv = QK^T dy + (k exp(b_last - b)) dS + WK^T dX."""
    (rows, m_t, r_k, m_k, m_tk, p_tk, p_cc, i_state, _, _, _) = _low_rank_chunk(
        chunk_table_ptr, lam_ptr, 0, H, K, BK, C)
    r_c = tl.arange(0, C)
    causal = r_c[:, None] >= r_c[None, :]
    earlier = r_c[:, None] > r_c[None, :]
    L_inv = tl.load(inv_ptr + p_cc)
    WK = tl.load(wk_ptr + p_cc)
    dQX = tl.zeros([C, C], dtype=tl.float32)
    dQK = tl.zeros([C, C], dtype=tl.float32)
    dWX = tl.load(dwx_ptr + p_cc)           # dR W^T, from low_rank_state_grads_kernel
    dWK = tl.zeros([C, C], dtype=tl.float32)
    for i_v in tl.static_range(NV):         # the products' gradients
        r_k, r_v, m_k, m_v, m_kv, p_kv = _tile(0, i_v, K, V, BK, BV)
        m_tv = m_t[:, None] & m_v[None, :]
        p_tv = rows[:, None] * V + r_v[None, :]
        U = tl.load(u_ptr + p_tv, mask=m_tv, other=0.0)
        v = tl.load(v_ptr + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        dX = _mm(tl.trans(L_inv), tl.load(du_ptr + p_tv, mask=m_tv, other=0.0), DOT)
        dQX += _mm(dy, tl.trans(U), DOT)
        dQK += _mm(dy, tl.trans(v), DOT)
        # U0^T = V^T WK^T L^-T, no transpose of a dot's result (fla #640)
        dWX += _mm(dX, _mm(_mm(tl.trans(v), tl.trans(WK), DOT), tl.trans(L_inv), DOT), DOT)
        dWK += _mm(dX, tl.trans(v), DOT)
    tl.store(dqx_ptr + p_cc, tl.where(causal, dQX, 0.0))
    tl.store(dqk_ptr + p_cc, tl.where(causal, dQK, 0.0))
    tl.store(dwx_ptr + p_cc, tl.where(earlier, dWX, 0.0))
    tl.store(dwk_ptr + p_cc, tl.where(earlier, dWK, 0.0))
    # dv in a second pass over V (dX made again): the four [C, C] gradients above and the
    # [C, K] decayed keys are not live at once (Triton 3.6 spilled 1.8 KB per thread)
    QK = tl.load(qk_ptr + p_cc)
    k_factor, _ = _key_factor(lam_ptr, rows, m_t, r_k, m_k, K, 2, H)
    k_dec = _rows_of(k_ptr, rows, m_t, r_k, m_k, K).to(tl.float32) * k_factor
    for i_v in tl.static_range(NV):
        r_k, r_v, m_k, m_v, m_kv, p_kv = _tile(0, i_v, K, V, BK, BV)
        m_tv = m_t[:, None] & m_v[None, :]
        p_tv = rows[:, None] * V + r_v[None, :]
        dy = tl.load(dy_ptr + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        dX = _mm(tl.trans(L_inv), tl.load(du_ptr + p_tv, mask=m_tv, other=0.0), DOT)
        dS = tl.load(dckpt_ptr + i_state * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
        tl.store(dv_ptr + p_tv, _mm(tl.trans(QK), dy, DOT) + _mm(k_dec, dS, DOT)
                 + _mm(tl.trans(WK), dX, DOT), mask=m_tv)
