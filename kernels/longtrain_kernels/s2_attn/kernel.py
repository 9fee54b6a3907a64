"""Triton block-sparse flash attention for S2-Attention (see README.md).

Legend: B batch, Tq query rows, Tk keys, H query heads, GROUP query heads per key/value head,
D head dim (HEAD_DIM), BLOCK the pattern's block size (query and key tiles are both one
pattern block). A forward / dq program owns one query block of one head and visits only its
allowed key blocks: the vertical blocks (phase, phase + VERT, ... below the local window; for
a dense head, PHASE[h] = -1, every block below the window), then the window, the diagonal
block last and the only one needing the causal mask. A dk/dv program owns one key block of one
kv head and visits, per query head of its group, the query blocks that read it (the
transposed pattern): the diagonal, the rest of the window, then every later query block if
the key block is vertical for that head (or the head is dense). The per-tile work is
flash_attn/kernel.py's (scores in the log2 domain, s2 = scale * log2(e) * q.k) with query
rows at q_offset = q_start and keys at k_offset = 0; `q_start`, Tq and Tk are multiples of
BLOCK, so only the diagonal tile is masked (its bounds checks always pass). Document ids mask
every visited tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from longtrain_kernels.flash_attn.kernel import (LN2, _dkdv_tiles, _dq_tile, _dq_tiles,
                                                 _fwd_tile, _fwd_tiles, _key_tile, _query_tile)


@triton.jit
def _key_plan(PHASE, h, i, LOCAL: tl.constexpr, VERT: tl.constexpr):
    """(first vertical block, its stride, first window block) for query block i of head h."""
    phase = tl.load(PHASE + h)
    lo = tl.maximum(i - LOCAL + 1, 0)
    v_start = tl.where(phase < 0, 0, phase)
    v_step = tl.where(phase < 0, 1, VERT)
    return v_start, v_step, lo


@triton.jit
def _query_side(Q, K, V, QDOC, KDOC, stride_qb, stride_qt, stride_qh, stride_kb, stride_kh,
                stride_vb, stride_vh, stride_qdb, stride_kdb, H, Tq, q_block0,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                HAS_DOC: tl.constexpr):
    """This program's (batch, head, global query block, local rows, q tile, K and V at its kv
    head, the rows' doc ids, KDOC at its batch); grid = (query blocks, B * H)."""
    b, h, hkv, m0, offs_m, _ = _query_tile(H, Tq, GROUP, BLOCK)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt
                + tl.arange(0, HEAD_DIM)[None, :])
    K += b * stride_kb + hkv * stride_kh
    V += b * stride_vb + hkv * stride_vh
    if HAS_DOC:
        q_doc = tl.load(QDOC + b * stride_qdb + offs_m)
        KDOC += b * stride_kdb
    else:
        q_doc = offs_m
    return b, h, q_block0 + m0 // BLOCK, offs_m, q, K, V, q_doc, KDOC


@triton.jit
def s2_fwd_kernel(Q, K, V, O, LSE, QDOC, KDOC, PHASE,
                  stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                  stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
                  stride_qdb, stride_kdb, H, Tq, Tk, q_block0, qk_scale,
                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                  LOCAL: tl.constexpr, VERT: tl.constexpr, HAS_DOC: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """out [B, Tq, H, D] and lse [B, H, Tq] (natural log) of one query block of one head."""
    b, h, i, offs_m, q, K, V, q_doc, KDOC = _query_side(
        Q, K, V, QDOC, KDOC, stride_qb, stride_qt, stride_qh, stride_kb, stride_kh, stride_vb,
        stride_vh, stride_qdb, stride_kdb, H, Tq, q_block0, GROUP, HEAD_DIM, BLOCK, HAS_DOC)
    q_start = q_block0 * BLOCK

    acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    v_start, v_step, lo = _key_plan(PHASE, h, i, LOCAL, VERT)
    for j in range(v_start, lo, v_step):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, offs_m, q_doc, K, V, KDOC, stride_kt,
                                  stride_vt, j * BLOCK, Tq, Tk, q_start, 0, qk_scale, BLOCK,
                                  HEAD_DIM, False, True, HAS_DOC, DOT_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, offs_m, q_doc, K, V, KDOC, stride_kt,
                               stride_vt, lo * BLOCK, i * BLOCK, Tq, Tk, q_start, 0, qk_scale,
                               BLOCK, HEAD_DIM, False, True, HAS_DOC, DOT_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, offs_m, q_doc, K, V, KDOC, stride_kt,
                               stride_vt, i * BLOCK, (i + 1) * BLOCK, Tq, Tk, q_start, 0,
                               qk_scale, BLOCK, HEAD_DIM, True, True, HAS_DOC, DOT_PRECISION)

    # Every row sees at least its own key, so l_i > 0.
    out = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * LN2
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty))
    tl.store(LSE + (b * H + h) * Tq + offs_m, lse)


@triton.jit
def s2_bwd_dq_kernel(Q, K, V, DO, DQ, LSE2, DELTA, QDOC, KDOC, PHASE,
                     stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                     stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                     stride_dqb, stride_dqt, stride_dqh, stride_qdb, stride_kdb,
                     H, Tq, Tk, q_block0, scale, qk_scale,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                     LOCAL: tl.constexpr, VERT: tl.constexpr, HAS_DOC: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """dq [B, Tq, H, D] of one query block of one head over its allowed key blocks."""
    b, h, i, offs_m, q, K, V, q_doc, KDOC = _query_side(
        Q, K, V, QDOC, KDOC, stride_qb, stride_qt, stride_qh, stride_kb, stride_kh, stride_vb,
        stride_vh, stride_qdb, stride_kdb, H, Tq, q_block0, GROUP, HEAD_DIM, BLOCK, HAS_DOC)
    q_start = q_block0 * BLOCK
    offs_d = tl.arange(0, HEAD_DIM)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :])
    row = (b * H + h) * Tq + offs_m
    lse2 = tl.load(LSE2 + row)
    delta = tl.load(DELTA + row)

    dq = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    v_start, v_step, lo = _key_plan(PHASE, h, i, LOCAL, VERT)
    for j in range(v_start, lo, v_step):
        dq = _dq_tile(dq, q, do, lse2, delta, offs_m, q_doc, K, V, KDOC, stride_kt, stride_vt,
                      j * BLOCK, Tq, Tk, q_start, 0, qk_scale, BLOCK, HEAD_DIM, False, True,
                      HAS_DOC, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, offs_m, q_doc, K, V, KDOC, stride_kt, stride_vt,
                   lo * BLOCK, i * BLOCK, Tq, Tk, q_start, 0, qk_scale, BLOCK, HEAD_DIM, False,
                   True, HAS_DOC, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, offs_m, q_doc, K, V, KDOC, stride_kt, stride_vt,
                   i * BLOCK, (i + 1) * BLOCK, Tq, Tk, q_start, 0, qk_scale, BLOCK, HEAD_DIM,
                   True, True, HAS_DOC, DOT_PRECISION)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt
             + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty))


@triton.jit
def s2_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE2, DELTA, QDOC, KDOC, PHASE,
                       stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                       stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                       stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
                       stride_qdb, stride_kdb, Hkv, Tq, Tk, q_block0, scale, qk_scale,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                       LOCAL: tl.constexpr, VERT: tl.constexpr, HAS_DOC: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """dk, dv [B, Tk, Hkv, D] of one key block of one kv head, summed over its GROUP heads."""
    b, hkv, n0, pos_n, k, v, k_doc, QDOC = _key_tile(
        K, V, KDOC, QDOC, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_qdb, stride_kdb, Hkv, Tk, BLOCK, HEAD_DIM, HAS_DOC)
    j = n0 // BLOCK

    # Query blocks are global q_block0 .. q_end - 1; block i holds local rows from
    # (i - q_block0) * BLOCK. Each part below is a run of query blocks as local rows [lo, hi).
    q_end = q_block0 + Tq // BLOCK
    q_start = q_block0 * BLOCK
    diag_lo = (tl.maximum(j, q_block0) - q_block0) * BLOCK
    diag_hi = (tl.minimum(j + 1, q_end) - q_block0) * BLOCK
    win_lo = (tl.maximum(j + 1, q_block0) - q_block0) * BLOCK
    win_hi = (tl.minimum(j + LOCAL, q_end) - q_block0) * BLOCK
    far_lo = (tl.maximum(j + LOCAL, q_block0) - q_block0) * BLOCK
    dk = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):
        h = hkv * GROUP + g
        row0 = (b * (Hkv * GROUP) + h) * Tq
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        dk, dv = _dkdv_tiles(dk, dv, k, v, pos_n, k_doc, q_base, do_base, LSE2 + row0,
                             DELTA + row0, QDOC, stride_qt, stride_dot, diag_lo, diag_hi, Tq,
                             q_start, 0, qk_scale, BLOCK, HEAD_DIM, True, True, HAS_DOC, True,
                             DOT_PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, pos_n, k_doc, q_base, do_base, LSE2 + row0,
                             DELTA + row0, QDOC, stride_qt, stride_dot, win_lo, win_hi, Tq,
                             q_start, 0, qk_scale, BLOCK, HEAD_DIM, False, True, HAS_DOC, True,
                             DOT_PRECISION)
        # Beyond the window only if block j is vertical for head h (or h is dense).
        phase = tl.load(PHASE + h)
        far_hi = tl.where((phase < 0) | (j % VERT == phase), Tq, far_lo)
        dk, dv = _dkdv_tiles(dk, dv, k, v, pos_n, k_doc, q_base, do_base, LSE2 + row0,
                             DELTA + row0, QDOC, stride_qt, stride_dot, far_lo, far_hi, Tq,
                             q_start, 0, qk_scale, BLOCK, HEAD_DIM, False, True, HAS_DOC, True,
                             DOT_PRECISION)
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(DK + b * stride_dkb + hkv * stride_dkh + pos_n[:, None] * stride_dkt
             + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty))
    tl.store(DV + b * stride_dvb + hkv * stride_dvh + pos_n[:, None] * stride_dvt
             + offs_d[None, :], dv.to(DV.dtype.element_ty))
