"""PyTorch block-sparse S2-Attention: forward and hand-written backward, skipping blocks.

Legend: B batch, Tq query rows, Tk keys, H query heads, Hkv key/value heads, D head dim,
bs the pattern's block size. Per chunk of query blocks and group of heads: n query blocks,
M key-block slots per query block (the most any row of the chunk needs), G heads.
`q_bhtd` [B, H, Tq, D], `k_bhtd` [B, Hkv, Tk, D], `lse_bht` [B, H, Tq],
`s_bgnqmk` [B, G, n, bs, M, bs] (scores of n query blocks against their M gathered key blocks).

Each query block gathers only its allowed key blocks (the local window and the head's
vertical blocks, or every causal block for a dense head) and runs one softmax over them, so a
sparse head costs O(T * (local_blocks * bs + T / vert_stride)) time and, per chunk, that much
memory; nothing [T, T]-sized exists. Dense and sparse heads are separate groups so a sparse
head is never padded to a dense head's slot count. The backward recomputes the probabilities
from the saved out and lse (flash style) and scatter-adds dk / dv into the gathered blocks.
`plan` is the exact schedule both directions run; `plan_tiles` counts its block products.
No autograd here (see function.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from longtrain_kernels.s2_attn.pattern import S2Pattern

# Elements of one chunk's score tensor: bounds the transient memory of both directions.
_CHUNK_ELEMENTS = 1 << 22
_MIN_CHUNK_BLOCKS = 8


class Chunk(NamedTuple):
    """One step of the schedule: local heads `heads` [G] x local query blocks [q0, q1)."""

    heads: torch.Tensor
    q0: int
    q1: int
    # [G, n, M] key block of each slot; padding slots repeat the diagonal block (always
    # allowed, so padding never reads a block the head may not see) and are masked.
    idx: torch.Tensor
    valid: torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Compute precision: float64 for float64 inputs (tests), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=64)
def plan(pattern: S2Pattern, *, batch: int, num_q_heads: int, head_offset: int,
         q_block0: int, n_q_blocks: int) -> tuple[Chunk, ...]:
    """Chunks covering every (local head, local query block), each listing only allowed blocks."""
    chunks: list[Chunk] = []
    bs = pattern.block_size
    local = range(num_q_heads)
    groups = ([h for h in local if pattern.is_dense_head(head_offset + h)],
              [h for h in local if not pattern.is_dense_head(head_offset + h)])
    for heads in groups:
        if not heads:
            continue
        last = q_block0 + n_q_blocks - 1
        most = max(len(pattern.key_blocks(last, head_offset + h)) for h in heads)
        per_block = batch * len(heads) * bs * bs * most
        # Rows of a chunk are padded to its longest row: a dense row gains a block per query
        # block, a sparse row one per vert_stride, so short chunks keep the padding small.
        cap = max(_MIN_CHUNK_BLOCKS, pattern.vert_stride)
        n = max(1, min(cap, _CHUNK_ELEMENTS // per_block, n_q_blocks))
        for q0 in range(0, n_q_blocks, n):
            q1 = min(q0 + n, n_q_blocks)
            chunks.append(_chunk(pattern, heads, head_offset, q_block0, q0, q1))
    return tuple(chunks)


def _chunk(pattern: S2Pattern, heads: list[int], head_offset: int, q_block0: int, q0: int,
           q1: int) -> Chunk:
    n_k = q_block0 + q1
    mask_gnk = pattern.block_mask(q1 - q0, n_k, [head_offset + h for h in heads],
                                  q_block_offset=q_block0 + q0)
    count_gn = mask_gnk.sum(-1)
    slots = int(count_gn.max())
    # Stable sort of "not allowed" puts the allowed blocks first, in ascending order.
    order = torch.sort((~mask_gnk).to(torch.int8), dim=-1, stable=True).indices[..., :slots]
    valid = torch.arange(slots) < count_gn[..., None]
    diag = (q_block0 + torch.arange(q0, q1)).view(1, -1, 1)
    idx = torch.where(valid, order, diag)
    return Chunk(torch.tensor(heads), q0, q1, idx, valid)


def plan_tiles(chunks: tuple[Chunk, ...], *, batch: int) -> int:
    """(batch, head, query block, key block) products the schedule computes, padding included."""
    return sum(batch * c.idx.numel() for c in chunks)


class _Gathered(NamedTuple):
    q_bgnqd: torch.Tensor
    k_bgnmkd: torch.Tensor
    v_bgnmkd: torch.Tensor
    allowed: torch.Tensor
    kv_heads: torch.Tensor


def _gather(c: Chunk, q_bhtd: torch.Tensor, k_bhjkd: torch.Tensor, v_bhjkd: torch.Tensor,
            bs: int, q_block0: int, q_doc: Optional[torch.Tensor],
            k_doc_bjk: Optional[torch.Tensor]) -> _Gathered:
    b, h, _, d = q_bhtd.shape
    kv_heads = c.heads // (h // k_bhjkd.shape[1])
    n = c.q1 - c.q0
    dt = acc_dtype(q_bhtd.dtype)
    q_bgnqd = q_bhtd[:, c.heads, c.q0 * bs:c.q1 * bs].to(dt).reshape(b, -1, n, bs, d)
    k_bgnmkd = k_bhjkd[:, kv_heads.view(-1, 1, 1), c.idx].to(dt)
    v_bgnmkd = v_bhjkd[:, kv_heads.view(-1, 1, 1), c.idx].to(dt)
    # Only the diagonal slot needs the causal rule: other allowed blocks lie wholly before.
    q_pos_nq = (q_block0 + torch.arange(c.q0, c.q1)).view(-1, 1) * bs + torch.arange(bs)
    k_pos_gnmk = c.idx[..., None] * bs + torch.arange(bs)
    allowed = (k_pos_gnmk[:, :, None] <= q_pos_nq[None, :, :, None, None])
    allowed = (allowed & c.valid[:, :, None, :, None])[None].to(q_bhtd.device)
    if q_doc is not None:
        q_doc_bnq = q_doc[:, c.q0 * bs:c.q1 * bs].reshape(b, 1, n, bs, 1, 1)
        k_doc_bgnmk = k_doc_bjk[:, c.idx]
        allowed = allowed & (q_doc_bnq == k_doc_bgnmk[:, :, :, None])
    return _Gathered(q_bgnqd, k_bgnmkd, v_bgnmkd, allowed, kv_heads)


def _blocks(k_bhtd: torch.Tensor, v_bhtd: torch.Tensor, k_doc: Optional[torch.Tensor],
            bs: int) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """k, v as [B, Hkv, Tk / bs, bs, D] and k_doc as [B, Tk / bs, bs] (one copy per call)."""
    b, hkv, tk, d = k_bhtd.shape
    k_doc_bjk = None if k_doc is None else k_doc.reshape(b, tk // bs, bs)
    return (k_bhtd.reshape(b, hkv, tk // bs, bs, d), v_bhtd.reshape(b, hkv, tk // bs, bs, d),
            k_doc_bjk)


def _scores(g: _Gathered, scale: float) -> torch.Tensor:
    s_bgnqmk = torch.einsum("bgnqd,bgnmkd->bgnqmk", g.q_bgnqd, g.k_bgnmkd) * scale
    return s_bgnqmk.masked_fill(~g.allowed, float("-inf"))


def blocked_forward(q_bhtd: torch.Tensor, k_bhtd: torch.Tensor, v_bhtd: torch.Tensor,
                    pattern: S2Pattern, *, head_offset: int, q_start: int, scale: float,
                    q_doc: Optional[torch.Tensor], k_doc: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, Tq, D] input dtype, lse [B, H, Tq] float32 / float64 for float64)."""
    b, h, tq, d = q_bhtd.shape
    bs, q_block0 = pattern.block_size, q_start // pattern.block_size
    dt = acc_dtype(q_bhtd.dtype)
    out_bhtd = torch.empty_like(q_bhtd)
    lse_bht = torch.empty(b, h, tq, dtype=dt, device=q_bhtd.device)
    chunks = plan(pattern, batch=b, num_q_heads=h, head_offset=head_offset, q_block0=q_block0,
                  n_q_blocks=tq // bs)
    k_bhjkd, v_bhjkd, k_doc_bjk = _blocks(k_bhtd, v_bhtd, k_doc, bs)
    for c in chunks:
        g = _gather(c, q_bhtd, k_bhjkd, v_bhjkd, bs, q_block0, q_doc, k_doc_bjk)
        s = _scores(g, scale)
        lse_bgnq = torch.logsumexp(s.flatten(-2), dim=-1)
        p = torch.exp(s - lse_bgnq[..., None, None])
        o_bgnqd = torch.einsum("bgnqmk,bgnmkd->bgnqd", p, g.v_bgnmkd)
        rows = slice(c.q0 * bs, c.q1 * bs)
        out_bhtd[:, c.heads, rows] = o_bgnqd.reshape(b, -1, (c.q1 - c.q0) * bs, d).to(
            q_bhtd.dtype)
        lse_bht[:, c.heads, rows] = lse_bgnq.reshape(b, -1, (c.q1 - c.q0) * bs)
    return out_bhtd, lse_bht


def blocked_backward(dout_bhtd: torch.Tensor, q_bhtd: torch.Tensor, k_bhtd: torch.Tensor,
                     v_bhtd: torch.Tensor, out_bhtd: torch.Tensor, lse_bht: torch.Tensor,
                     pattern: S2Pattern, *, head_offset: int, q_start: int, scale: float,
                     q_doc: Optional[torch.Tensor], k_doc: Optional[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq [B, H, Tq, D], dk, dv [B, Hkv, Tk, D]) in the inputs' dtypes, from out and lse."""
    b, h, tq, d = q_bhtd.shape
    hkv, tk = k_bhtd.shape[1], k_bhtd.shape[2]
    bs, q_block0 = pattern.block_size, q_start // pattern.block_size
    dt = acc_dtype(q_bhtd.dtype)
    delta_bht = (dout_bhtd.to(dt) * out_bhtd.to(dt)).sum(-1)
    dq_bhtd = torch.empty(b, h, tq, d, dtype=dt, device=q_bhtd.device)
    # Key blocks flattened over (kv head, block) so a chunk's slots scatter with one index_add_.
    dk_bjkd = torch.zeros(b, hkv * (tk // bs), bs, d, dtype=dt, device=q_bhtd.device)
    dv_bjkd = torch.zeros_like(dk_bjkd)
    chunks = plan(pattern, batch=b, num_q_heads=h, head_offset=head_offset, q_block0=q_block0,
                  n_q_blocks=tq // bs)
    k_bhjkd, v_bhjkd, k_doc_bjk = _blocks(k_bhtd, v_bhtd, k_doc, bs)
    for c in chunks:
        g = _gather(c, q_bhtd, k_bhjkd, v_bhjkd, bs, q_block0, q_doc, k_doc_bjk)
        n, rows = c.q1 - c.q0, slice(c.q0 * bs, c.q1 * bs)
        lse_bgnq = lse_bht[:, c.heads, rows].to(dt).reshape(b, -1, n, bs)
        delta_bgnq = delta_bht[:, c.heads, rows].reshape(b, -1, n, bs)
        do_bgnqd = dout_bhtd[:, c.heads, rows].to(dt).reshape(b, -1, n, bs, d)
        p = torch.exp(_scores(g, scale) - lse_bgnq[..., None, None])
        dp = torch.einsum("bgnqd,bgnmkd->bgnqmk", do_bgnqd, g.v_bgnmkd)
        ds = p * (dp - delta_bgnq[..., None, None])
        dq = torch.einsum("bgnqmk,bgnmkd->bgnqd", ds, g.k_bgnmkd) * scale
        dq_bhtd[:, c.heads, rows] = dq.reshape(b, -1, n * bs, d)
        dk = torch.einsum("bgnqmk,bgnqd->bgnmkd", ds, g.q_bgnqd) * scale
        dv = torch.einsum("bgnqmk,bgnqd->bgnmkd", p, do_bgnqd)
        slot = (g.kv_heads.view(-1, 1, 1) * (tk // bs) + c.idx).reshape(-1).to(q_bhtd.device)
        dk_bjkd.index_add_(1, slot, dk.reshape(b, -1, bs, d))
        dv_bjkd.index_add_(1, slot, dv.reshape(b, -1, bs, d))
    dk_bhtd = dk_bjkd.view(b, hkv, tk, d).to(k_bhtd.dtype)
    dv_bhtd = dv_bjkd.view(b, hkv, tk, d).to(v_bhtd.dtype)
    return dq_bhtd.to(q_bhtd.dtype), dk_bhtd, dv_bhtd
