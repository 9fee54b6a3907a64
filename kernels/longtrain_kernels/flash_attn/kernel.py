"""Triton kernels for one block of attention with its log-sum-exp (see README.md).

Legend: B batch, Tq query rows and Tk key columns of the block, H query heads, GROUP query
heads per key/value head, D head dim (HEAD_DIM). A program owns a tile of BLOCK_M query rows
(forward, dq) or BLOCK_N key columns (dk/dv) of one head and loops over the other side.
Scores are kept in the log2 domain: s2 = scale * log2(e) * q.k, so softmax is one exp2.
Inner tiles are visited in two phases: tiles where every entry is allowed by the causal rule
and in bounds (no mask work), then the tiles that need the element mask. Tiles that are
entirely above the causal diagonal are never visited. Document ids mask every tile, and a
tile whose ids on one side all fall outside the other side's [min, max] id range is skipped
(its loads and dots are not done): with packed documents the far tiles of a long block are
skipped instead of computed and masked.

Host code that allocates and launches these lives in launch.py; the kernels only read strides
of the batch, time and head dims (the head dim is contiguous).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _allowed(offs_m, offs_n, q_doc, KDOC, Tq, Tk, q_offset, k_offset,
             BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr):
    """Bool [BLOCK_M, BLOCK_N]: where query row offs_m may attend to key column offs_n."""
    allowed = (offs_m[:, None] >= 0) & (offs_n[None, :] >= 0)
    if BOUNDS:
        allowed = allowed & (offs_m[:, None] < Tq) & (offs_n[None, :] < Tk)
    if CAUSAL:
        allowed = allowed & ((k_offset + offs_n)[None, :] <= (q_offset + offs_m)[:, None])
    if HAS_DOC:
        k_doc = tl.load(KDOC + offs_n, mask=offs_n < Tk, other=-1)
        allowed = allowed & (q_doc[:, None] == k_doc[None, :])
    return allowed


@triton.jit
def _docs_overlap(DOC, start, T, lo, hi, BLOCK: tl.constexpr):
    """Whether any id of DOC[start : start + BLOCK] lies in [lo, hi] (padding reads -1, which
    only ever keeps a tile): a tile outside it shares no document with the other side's."""
    offs = start + tl.arange(0, BLOCK)
    ids = tl.load(DOC + offs, mask=offs < T, other=-1)
    return (tl.max(ids, 0) >= lo) & (tl.min(ids, 0) <= hi)


@triton.jit
def _key_cols(X, offs_n, stride_xt, Tk, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """[HEAD_DIM, BLOCK_N]: keys (or values) at columns offs_n, transposed; 0 past Tk."""
    ptrs = X + offs_n[None, :] * stride_xt + tl.arange(0, HEAD_DIM)[:, None]
    if MASKED:
        xt = tl.load(ptrs, mask=offs_n[None, :] < Tk, other=0.0)
    else:
        xt = tl.load(ptrs)
    return xt


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, offs_m, q_doc, K, V, KDOC, stride_kt, stride_vt, n0,
              Tq, Tk, q_offset, k_offset, qk_scale,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) with the key tile at columns n0 .. n0 + BLOCK_N."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kt = _key_cols(K, offs_n, stride_kt, Tk, HEAD_DIM, MASKED)
    s2 = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    if MASKED or HAS_DOC:
        allowed = _allowed(offs_m, offs_n, q_doc, KDOC, Tq, Tk, q_offset, k_offset,
                           MASKED, CAUSAL and MASKED, HAS_DOC)
        s2 = tl.where(allowed, s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        # A row with nothing allowed so far keeps m = -inf; shift it by 0 so exp2 gives 0.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_shift = m_new
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s2 - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_ptrs = V + offs_n[:, None] * stride_vt + tl.arange(0, HEAD_DIM)[None, :]
    if MASKED:
        v = tl.load(v_ptrs, mask=offs_n[:, None] < Tk, other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, offs_m, q_doc, K, V, KDOC, stride_kt, stride_vt,
               n_start, n_end, Tq, Tk, q_offset, k_offset, qk_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    if HAS_DOC:
        q_lo, q_hi = tl.min(q_doc, 0), tl.max(q_doc, 0)
    for n0 in range(n_start, n_end, BLOCK_N):
        if HAS_DOC:
            # a tile whose keys share no document with the rows is skipped
            if _docs_overlap(KDOC, n0, Tk, q_lo, q_hi, BLOCK_N):
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, offs_m, q_doc, K, V, KDOC,
                                          stride_kt, stride_vt, n0, Tq, Tk, q_offset, k_offset,
                                          qk_scale, BLOCK_N, HEAD_DIM, MASKED, CAUSAL, HAS_DOC,
                                          DOT_PRECISION)
        else:
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, offs_m, q_doc, K, V, KDOC, stride_kt,
                                      stride_vt, n0, Tq, Tk, q_offset, k_offset, qk_scale,
                                      BLOCK_N, HEAD_DIM, MASKED, CAUSAL, HAS_DOC, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _causal_key_range(m0, Tk, q_offset, k_offset,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(end of the unmasked key tiles, end of all visited key tiles) for query tile m0."""
    if CAUSAL:
        # Last key any row of the tile may see, and last key every row of the tile may see.
        n_end = tl.minimum(Tk, tl.maximum(q_offset - k_offset + m0 + BLOCK_M, 0))
        n_full = tl.minimum(Tk, tl.maximum(q_offset - k_offset + m0 + 1, 0))
    else:
        n_end = Tk
        n_full = Tk
    n_full = (n_full // BLOCK_N) * BLOCK_N
    return n_full, n_end


@triton.jit
def _query_tile(H, Tq, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """(batch, query head, kv head, first row, rows, rows in bounds) of this program's query
    tile; grid = (query tiles, B * H)."""
    # Causal tiles further down have more keys: start them first for a better tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    return b, h, h // GROUP, m0, offs_m, offs_m < Tq


@triton.jit
def flash_fwd_kernel(Q, K, V, O, LSE, QDOC, KDOC,
                     stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                     stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
                     stride_qdb, stride_kdb,
                     H, Tq, Tk, q_offset, k_offset, qk_scale,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """out [B, Tq, H, D] and lse [B, H, Tq] (natural log) for one query tile of one head."""
    b, h, hkv, m0, offs_m, row_ok = _query_tile(H, Tq, GROUP, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)

    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + hkv * stride_kh
    V += b * stride_vb + hkv * stride_vh
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if HAS_DOC:
        q_doc = tl.load(QDOC + b * stride_qdb + offs_m, mask=row_ok, other=-1)
        KDOC += b * stride_kdb
    else:
        q_doc = offs_m

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    n_full, n_end = _causal_key_range(m0, Tk, q_offset, k_offset, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, offs_m, q_doc, K, V, KDOC, stride_kt,
                               stride_vt, 0, n_full, Tq, Tk, q_offset, k_offset, qk_scale,
                               BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_DOC, DOT_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, offs_m, q_doc, K, V, KDOC, stride_kt,
                               stride_vt, n_full, n_end, Tq, Tk, q_offset, k_offset, qk_scale,
                               BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_DOC, DOT_PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    O += b * stride_ob + h * stride_oh
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + (b * H + h) * Tq + offs_m, lse, mask=row_ok)


@triton.jit
def flash_bwd_preprocess_kernel(O, DO, LSE, DELTA, LSE2,
                                stride_ob, stride_ot, stride_oh, stride_dob, stride_dot,
                                stride_doh, H, Tq,
                                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) and lse2 = lse * log2(e) with -inf rows turned into +inf.

    With lse2 = +inf a row's probabilities exp2(s2 - lse2) are 0, so rows without any
    allowed key (and padding rows, loaded as +inf) contribute nothing to the gradients.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot
                + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    row = pid_bh.to(tl.int64) * Tq + offs_m
    lse = tl.load(LSE + row, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    tl.store(DELTA + row, tl.sum(o * do, 1), mask=row_ok)
    tl.store(LSE2 + row, lse2, mask=row_ok)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, offs_m, q_doc, K, V, KDOC, stride_kt, stride_vt, n0,
             Tq, Tk, q_offset, k_offset, qk_scale,
             BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
             CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dq plus the key tile at columns n0 .. n0 + BLOCK_N's share (before the final scale)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kt = _key_cols(K, offs_n, stride_kt, Tk, HEAD_DIM, MASKED)
    vt = _key_cols(V, offs_n, stride_vt, Tk, HEAD_DIM, MASKED)
    s2 = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    p = tl.exp2(s2 - lse2[:, None])
    if MASKED or HAS_DOC:
        allowed = _allowed(offs_m, offs_n, q_doc, KDOC, Tq, Tk, q_offset, k_offset,
                           MASKED, CAUSAL and MASKED, HAS_DOC)
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, offs_m, q_doc, K, V, KDOC, stride_kt, stride_vt,
              n_start, n_end, Tq, Tk, q_offset, k_offset, qk_scale,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    if HAS_DOC:
        q_lo, q_hi = tl.min(q_doc, 0), tl.max(q_doc, 0)
    for n0 in range(n_start, n_end, BLOCK_N):
        if HAS_DOC:
            if _docs_overlap(KDOC, n0, Tk, q_lo, q_hi, BLOCK_N):
                dq = _dq_tile(dq, q, do, lse2, delta, offs_m, q_doc, K, V, KDOC, stride_kt,
                              stride_vt, n0, Tq, Tk, q_offset, k_offset, qk_scale,
                              BLOCK_N, HEAD_DIM, MASKED, CAUSAL, HAS_DOC, DOT_PRECISION)
        else:
            dq = _dq_tile(dq, q, do, lse2, delta, offs_m, q_doc, K, V, KDOC, stride_kt,
                          stride_vt, n0, Tq, Tk, q_offset, k_offset, qk_scale,
                          BLOCK_N, HEAD_DIM, MASKED, CAUSAL, HAS_DOC, DOT_PRECISION)
    return dq


@triton.jit
def flash_bwd_dq_kernel(Q, K, V, DO, DQ, LSE2, DELTA, QDOC, KDOC,
                        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                        stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                        stride_dqb, stride_dqt, stride_dqh, stride_qdb, stride_kdb,
                        H, Tq, Tk, q_offset, k_offset, scale, qk_scale,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """dq [B, Tq, H, D] for one query tile of one head: scale * sum_j dS_ij k_j."""
    b, h, hkv, m0, offs_m, row_ok = _query_tile(H, Tq, GROUP, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)

    K += b * stride_kb + hkv * stride_kh
    V += b * stride_vb + hkv * stride_vh
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    row = (b * H + h) * Tq + offs_m
    lse2 = tl.load(LSE2 + row, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
    if HAS_DOC:
        q_doc = tl.load(QDOC + b * stride_qdb + offs_m, mask=row_ok, other=-1)
        KDOC += b * stride_kdb
    else:
        q_doc = offs_m

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full, n_end = _causal_key_range(m0, Tk, q_offset, k_offset, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_tiles(dq, q, do, lse2, delta, offs_m, q_doc, K, V, KDOC, stride_kt, stride_vt,
                   0, n_full, Tq, Tk, q_offset, k_offset, qk_scale,
                   BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_DOC, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, offs_m, q_doc, K, V, KDOC, stride_kt, stride_vt,
                   n_full, n_end, Tq, Tk, q_offset, k_offset, qk_scale,
                   BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_DOC, DOT_PRECISION)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt
             + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_tile(dk, dv, k, v, offs_n, k_doc, Q, DO, LSE2, DELTA, QDOC, stride_qt, stride_dot,
               m0, Tq, q_offset, k_offset, qk_scale,
               BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, EVEN_M: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """dk, dv plus the query tile at rows m0 .. m0 + BLOCK_M's share."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    qt_ptrs = Q + offs_m[None, :] * stride_qt + offs_d[:, None]
    do_ptrs = DO + offs_m[:, None] * stride_dot + offs_d[None, :]
    # Padding rows load lse2 = +inf (probability 0), so their q and dO can be anything.
    if EVEN_M:
        qt = tl.load(qt_ptrs)
        do = tl.load(do_ptrs)
        lse2 = tl.load(LSE2 + offs_m)
        delta = tl.load(DELTA + offs_m)
    else:
        row_ok = offs_m < Tq
        qt = tl.load(qt_ptrs, mask=row_ok[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(LSE2 + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    # Transposed scores: [BLOCK_N keys, BLOCK_M queries].
    s2t = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale
    pt = tl.exp2(s2t - lse2[None, :])
    if MASKED or HAS_DOC:
        if HAS_DOC:
            q_doc = tl.load(QDOC + offs_m, mask=offs_m < Tq, other=-1)
            allowed = q_doc[None, :] == k_doc[:, None]
        else:
            allowed = (offs_n[:, None] >= 0) & (offs_m[None, :] >= 0)
        if MASKED and CAUSAL:
            allowed = allowed & ((k_offset + offs_n)[:, None] <= (q_offset + offs_m)[None, :])
        pt = tl.where(allowed, pt, 0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_tiles(dk, dv, k, v, offs_n, k_doc, Q, DO, LSE2, DELTA, QDOC, stride_qt, stride_dot,
                m_start, m_end, Tq, q_offset, k_offset, qk_scale,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, EVEN_M: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    if HAS_DOC:
        k_lo, k_hi = tl.min(k_doc, 0), tl.max(k_doc, 0)
    for m0 in range(m_start, m_end, BLOCK_M):
        if HAS_DOC:
            # a query tile that shares no document with the keys is skipped
            if _docs_overlap(QDOC, m0, Tq, k_lo, k_hi, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, offs_n, k_doc, Q, DO, LSE2, DELTA, QDOC,
                                    stride_qt, stride_dot, m0, Tq, q_offset, k_offset,
                                    qk_scale, BLOCK_M, HEAD_DIM, MASKED, CAUSAL, HAS_DOC,
                                    EVEN_M, DOT_PRECISION)
        else:
            dk, dv = _dkdv_tile(dk, dv, k, v, offs_n, k_doc, Q, DO, LSE2, DELTA, QDOC,
                                stride_qt, stride_dot, m0, Tq, q_offset, k_offset, qk_scale,
                                BLOCK_M, HEAD_DIM, MASKED, CAUSAL, HAS_DOC, EVEN_M,
                                DOT_PRECISION)
    return dk, dv


@triton.jit
def _key_tile(K, V, KDOC, QDOC, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
              stride_vh, stride_qdb, stride_kdb, Hkv, Tk,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_DOC: tl.constexpr):
    """(batch, kv head, first key, keys, k and v [BLOCK_N, D] (0 past Tk), the keys' doc ids,
    QDOC at the batch) of this program's key tile; grid = (key tiles, B * Hkv)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hkv = pid_bh % Hkv
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < Tk
    k = tl.load(K + b * stride_kb + hkv * stride_kh + offs_n[:, None] * stride_kt
                + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + hkv * stride_vh + offs_n[:, None] * stride_vt
                + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    if HAS_DOC:
        k_doc = tl.load(KDOC + b * stride_kdb + offs_n, mask=col_ok, other=-1)
        QDOC += b * stride_qdb
    else:
        k_doc = offs_n
    return b, hkv, n0, offs_n, k, v, k_doc, QDOC


@triton.jit
def flash_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE2, DELTA, QDOC, KDOC,
                          stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                          stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                          stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt,
                          stride_dvh, stride_qdb, stride_kdb,
                          Hkv, Tq, Tk, q_offset, k_offset, scale, qk_scale,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
                          EVEN_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dk, dv [B, Tk, Hkv, D] for one key tile of one key/value head, summed over its GROUP."""
    b, hkv, n0, offs_n, k, v, k_doc, QDOC = _key_tile(
        K, V, KDOC, QDOC, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_qdb, stride_kdb, Hkv, Tk, BLOCK_N, HEAD_DIM, HAS_DOC)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < Tk

    if CAUSAL:
        # First query row that sees any key of the tile, and first that sees all of them.
        m_lo = tl.maximum(k_offset - q_offset + n0, 0)
        m_full = tl.maximum(k_offset - q_offset + n0 + BLOCK_N - 1, m_lo)
        m_lo = (m_lo // BLOCK_M) * BLOCK_M
        m_full = tl.cdiv(m_full, BLOCK_M) * BLOCK_M
    else:
        m_lo = 0
        m_full = 0
    m_mask_end = tl.minimum(m_full, Tq)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):
        h = hkv * GROUP + g
        row0 = (b * (Hkv * GROUP) + h) * Tq
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        dk, dv = _dkdv_tiles(dk, dv, k, v, offs_n, k_doc, q_base, do_base, LSE2 + row0,
                             DELTA + row0, QDOC, stride_qt, stride_dot, m_lo, m_mask_end, Tq,
                             q_offset, k_offset, qk_scale, BLOCK_M, HEAD_DIM, True, CAUSAL,
                             HAS_DOC, EVEN_M, DOT_PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, offs_n, k_doc, q_base, do_base, LSE2 + row0,
                             DELTA + row0, QDOC, stride_qt, stride_dot, m_full, Tq, Tq,
                             q_offset, k_offset, qk_scale, BLOCK_M, HEAD_DIM, False, CAUSAL,
                             HAS_DOC, EVEN_M, DOT_PRECISION)
    tl.store(DK + b * stride_dkb + hkv * stride_dkh + offs_n[:, None] * stride_dkt
             + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + b * stride_dvb + hkv * stride_dvh + offs_n[:, None] * stride_dvt
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
