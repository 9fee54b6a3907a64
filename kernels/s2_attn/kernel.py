"""Triton block-sparse flash attention for S2-Attention (see README.md).

Legend: B batch, Tq query rows, Tk keys, H query heads, GROUP query heads per key/value head,
D head dim (HEAD_DIM), BLOCK the pattern's block size (query and key tiles are both one
pattern block). A forward / dq program owns one query block of one head and visits only its
allowed key blocks: the vertical blocks (phase, phase + VERT, ... below the local window; for
a dense head, PHASE[h] = -1, every block below the window), then the window, the diagonal
block last and the only one needing the causal mask. A dk/dv program owns one key block of one
kv head and visits, per query head of its group, the query blocks that read it (the
transposed pattern): the diagonal, the rest of the window, then every later query block if
the key block is vertical for that head (or the head is dense). Scores are in the log2 domain
(s2 = scale * log2(e) * q.k), as in flash_attn/kernel.py; `q_start`, Tq and Tk are multiples
of BLOCK, so no tile needs bounds masks. Document ids mask every visited tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _mask(pos_m, pos_n, q_doc, KDOC, DIAG: tl.constexpr, HAS_DOC: tl.constexpr):
    """Bool [BLOCK, BLOCK]: where query position pos_m may see key position pos_n."""
    allowed = (pos_m[:, None] >= 0) & (pos_n[None, :] >= 0)
    if DIAG:
        allowed = allowed & (pos_n[None, :] <= pos_m[:, None])
    if HAS_DOC:
        k_doc = tl.load(KDOC + pos_n)
        allowed = allowed & (q_doc[:, None] == k_doc[None, :])
    return allowed


@triton.jit
def _fwd_block(acc, l_i, m_i, q, pos_m, q_doc, K, V, KDOC, stride_kt, stride_vt, n0, qk_scale,
               BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, DIAG: tl.constexpr,
               HAS_DOC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    pos_n = n0 + tl.arange(0, BLOCK)
    kt = tl.load(K + pos_n[None, :] * stride_kt + offs_d[:, None])
    s2 = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    if DIAG or HAS_DOC:
        s2 = tl.where(_mask(pos_m, pos_n, q_doc, KDOC, DIAG, HAS_DOC), s2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s2, 1))
    # A row with nothing allowed so far (documents) keeps m = -inf: shift it by 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s2 - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + pos_n[:, None] * stride_vt + offs_d[None, :])
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _key_plan(PHASE, h, i, LOCAL: tl.constexpr, VERT: tl.constexpr):
    """(first vertical block, its stride, first window block) for query block i of head h."""
    phase = tl.load(PHASE + h)
    lo = tl.maximum(i - LOCAL + 1, 0)
    v_start = tl.where(phase < 0, 0, phase)
    v_step = tl.where(phase < 0, 1, VERT)
    return v_start, v_step, lo


@triton.jit
def _query_block(H, q_block0, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """(batch, head, kv head, global query block, local rows, global positions)."""
    # Later query blocks read more keys: start them first for a better tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    i = q_block0 + pid_m
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    return b, h, h // GROUP, i, offs_m, i * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def s2_fwd_kernel(Q, K, V, O, LSE, QDOC, KDOC, PHASE,
                  stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                  stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
                  stride_qdb, stride_kdb, H, Tq, q_block0, qk_scale,
                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                  LOCAL: tl.constexpr, VERT: tl.constexpr, HAS_DOC: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """out [B, Tq, H, D] and lse [B, H, Tq] (natural log) of one query block of one head."""
    b, h, hkv, i, offs_m, pos_m = _query_block(H, q_block0, GROUP, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt
                + offs_d[None, :])
    K += b * stride_kb + hkv * stride_kh
    V += b * stride_vb + hkv * stride_vh
    if HAS_DOC:
        q_doc = tl.load(QDOC + b * stride_qdb + offs_m)
        KDOC += b * stride_kdb
    else:
        q_doc = offs_m

    acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    v_start, v_step, lo = _key_plan(PHASE, h, i, LOCAL, VERT)
    for j in range(v_start, lo, v_step):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, pos_m, q_doc, K, V, KDOC, stride_kt,
                                   stride_vt, j * BLOCK, qk_scale, BLOCK, HEAD_DIM, False,
                                   HAS_DOC, DOT_PRECISION)
    for j in range(lo, i):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, pos_m, q_doc, K, V, KDOC, stride_kt,
                                   stride_vt, j * BLOCK, qk_scale, BLOCK, HEAD_DIM, False,
                                   HAS_DOC, DOT_PRECISION)
    acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, pos_m, q_doc, K, V, KDOC, stride_kt,
                               stride_vt, i * BLOCK, qk_scale, BLOCK, HEAD_DIM, True,
                               HAS_DOC, DOT_PRECISION)

    # Every row sees at least its own key, so l_i > 0.
    out = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * LN2
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty))
    tl.store(LSE + (b * H + h) * Tq + offs_m, lse)


@triton.jit
def _dq_block(dq, q, do, lse2, delta, pos_m, q_doc, K, V, KDOC, stride_kt, stride_vt, n0,
              qk_scale, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, DIAG: tl.constexpr,
              HAS_DOC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    pos_n = n0 + tl.arange(0, BLOCK)
    kt = tl.load(K + pos_n[None, :] * stride_kt + offs_d[:, None])
    vt = tl.load(V + pos_n[None, :] * stride_vt + offs_d[:, None])
    s2 = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    p = tl.exp2(s2 - lse2[:, None])
    if DIAG or HAS_DOC:
        p = tl.where(_mask(pos_m, pos_n, q_doc, KDOC, DIAG, HAS_DOC), p, 0.0)
    dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)


@triton.jit
def s2_bwd_dq_kernel(Q, K, V, DO, DQ, LSE2, DELTA, QDOC, KDOC, PHASE,
                     stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                     stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                     stride_dqb, stride_dqt, stride_dqh, stride_qdb, stride_kdb,
                     H, Tq, q_block0, scale, qk_scale,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                     LOCAL: tl.constexpr, VERT: tl.constexpr, HAS_DOC: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """dq [B, Tq, H, D] of one query block of one head over its allowed key blocks."""
    b, h, hkv, i, offs_m, pos_m = _query_block(H, q_block0, GROUP, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt
                + offs_d[None, :])
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :])
    row = (b * H + h) * Tq + offs_m
    lse2 = tl.load(LSE2 + row)
    delta = tl.load(DELTA + row)
    K += b * stride_kb + hkv * stride_kh
    V += b * stride_vb + hkv * stride_vh
    if HAS_DOC:
        q_doc = tl.load(QDOC + b * stride_qdb + offs_m)
        KDOC += b * stride_kdb
    else:
        q_doc = offs_m

    dq = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    v_start, v_step, lo = _key_plan(PHASE, h, i, LOCAL, VERT)
    for j in range(v_start, lo, v_step):
        dq = _dq_block(dq, q, do, lse2, delta, pos_m, q_doc, K, V, KDOC, stride_kt, stride_vt,
                       j * BLOCK, qk_scale, BLOCK, HEAD_DIM, False, HAS_DOC, DOT_PRECISION)
    for j in range(lo, i):
        dq = _dq_block(dq, q, do, lse2, delta, pos_m, q_doc, K, V, KDOC, stride_kt, stride_vt,
                       j * BLOCK, qk_scale, BLOCK, HEAD_DIM, False, HAS_DOC, DOT_PRECISION)
    dq = _dq_block(dq, q, do, lse2, delta, pos_m, q_doc, K, V, KDOC, stride_kt, stride_vt,
                   i * BLOCK, qk_scale, BLOCK, HEAD_DIM, True, HAS_DOC, DOT_PRECISION)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt
             + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty))


@triton.jit
def _dkdv_block(dk, dv, k, v, pos_n, k_doc, Q, DO, LSE2, DELTA, QDOC, stride_qt, stride_dot,
                m0, q_start, qk_scale, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                DIAG: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add one query block's (local rows m0 ..) share to dk, dv of this key block."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = m0 + tl.arange(0, BLOCK)
    qt = tl.load(Q + offs_m[None, :] * stride_qt + offs_d[:, None])
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :])
    lse2 = tl.load(LSE2 + offs_m)
    delta = tl.load(DELTA + offs_m)
    # Transposed scores: [BLOCK keys, BLOCK queries].
    s2t = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale
    pt = tl.exp2(s2t - lse2[None, :])
    if DIAG or HAS_DOC:
        allowed = (pos_n[:, None] >= 0) & (offs_m[None, :] >= 0)
        if DIAG:
            allowed = allowed & (pos_n[:, None] <= (q_start + offs_m)[None, :])
        if HAS_DOC:
            q_doc = tl.load(QDOC + offs_m)
            allowed = allowed & (q_doc[None, :] == k_doc[:, None])
        pt = tl.where(allowed, pt, 0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def s2_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE2, DELTA, QDOC, KDOC, PHASE,
                       stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                       stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                       stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
                       stride_qdb, stride_kdb, Hkv, Tq, q_block0, scale, qk_scale,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                       LOCAL: tl.constexpr, VERT: tl.constexpr, HAS_DOC: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """dk, dv [B, Tk, Hkv, D] of one key block of one kv head, summed over its GROUP heads."""
    j = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hkv = pid_bh % Hkv
    pos_n = j * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + b * stride_kb + hkv * stride_kh + pos_n[:, None] * stride_kt
                + offs_d[None, :])
    v = tl.load(V + b * stride_vb + hkv * stride_vh + pos_n[:, None] * stride_vt
                + offs_d[None, :])
    if HAS_DOC:
        k_doc = tl.load(KDOC + b * stride_kdb + pos_n)
        QDOC += b * stride_qdb
    else:
        k_doc = pos_n

    # Query blocks are global q_block0 .. q_end - 1; local rows start at (i - q_block0) * BLOCK.
    q_end = q_block0 + Tq // BLOCK
    q_start = q_block0 * BLOCK
    diag_lo = tl.maximum(j, q_block0)
    diag_hi = tl.minimum(j + 1, q_end)
    win_lo = tl.maximum(j + 1, q_block0)
    win_hi = tl.minimum(j + LOCAL, q_end)
    far_lo = tl.maximum(j + LOCAL, q_block0)
    dk = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):
        h = hkv * GROUP + g
        row0 = (b * (Hkv * GROUP) + h) * Tq
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        for i in range(diag_lo, diag_hi):
            dk, dv = _dkdv_block(dk, dv, k, v, pos_n, k_doc, q_base, do_base, LSE2 + row0,
                                 DELTA + row0, QDOC, stride_qt, stride_dot,
                                 (i - q_block0) * BLOCK, q_start, qk_scale, BLOCK, HEAD_DIM,
                                 True, HAS_DOC, DOT_PRECISION)
        for i in range(win_lo, win_hi):
            dk, dv = _dkdv_block(dk, dv, k, v, pos_n, k_doc, q_base, do_base, LSE2 + row0,
                                 DELTA + row0, QDOC, stride_qt, stride_dot,
                                 (i - q_block0) * BLOCK, q_start, qk_scale, BLOCK, HEAD_DIM,
                                 False, HAS_DOC, DOT_PRECISION)
        # Beyond the window only if block j is vertical for head h (or h is dense).
        phase = tl.load(PHASE + h)
        far_hi = tl.where((phase < 0) | (j % VERT == phase), q_end, 0)
        for i in range(far_lo, far_hi):
            dk, dv = _dkdv_block(dk, dv, k, v, pos_n, k_doc, q_base, do_base, LSE2 + row0,
                                 DELTA + row0, QDOC, stride_qt, stride_dot,
                                 (i - q_block0) * BLOCK, q_start, qk_scale, BLOCK, HEAD_DIM,
                                 False, HAS_DOC, DOT_PRECISION)
    tl.store(DK + b * stride_dkb + hkv * stride_dkh + pos_n[:, None] * stride_dkt
             + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty))
    tl.store(DV + b * stride_dvb + hkv * stride_dvh + pos_n[:, None] * stride_dvt
             + offs_d[None, :], dv.to(DV.dtype.element_ty))
