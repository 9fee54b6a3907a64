"""All-gather attention (LASP-2H's softmax layers) and the sequence gather it is built on.

Legend: B batch, T local sequence length (this rank's two zigzag chunks of L tokens each),
Hq / Hkv query / key-value heads, D head dim, n = 2 * cp chunks.

`allgather`: every rank all-gathers K/V (and document ids) over the CP group and computes
its own queries against the whole sequence, block by block with the fused kernels (each query
chunk against the earlier chunks, then causally against itself; documents as segments, no
mask); backward
reduce-scatters the full-length dK/dV to their owners (a ring of point-to-point steps where
the backend, gloo, has no reduce-scatter).
`gather_sequence` also serves s2's document ids and the LASP chunk bookkeeping.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from longtrain.attention.blocks import (acc_dtype, any_allowed, block_backward, block_forward,
                                        merge_block_)
from longtrain.attention.dense import dense_attention, softmax_forward_flops
from longtrain.attention.ring import kv_bytes
from longtrain.attention.types import AttentionContext, AttentionMeta, BackendSpec
from longtrain.parallel.collective_cost import (AttentionShape, Link, all_gather,
                                                reduce_scatter)
from longtrain.parallel.layout import zigzag_chunk_ids
from longtrain.parallel.watch import collective


def local_chunk_ids(ctx: AttentionContext) -> list[int]:
    """This rank's chunk indices in the 2*cp-chunk zigzag order ([0] at cp=1)."""
    return [0] if ctx.cp_size == 1 else list(zigzag_chunk_ids(ctx.cp_size, ctx.cp_rank))


def order_gathered(parts: list[torch.Tensor], cp: int) -> torch.Tensor:
    """Per-rank [2, ...] tensors (each rank's two zigzag chunks) -> [2cp, ...] in chunk order."""
    out: list[Optional[torch.Tensor]] = [None] * (2 * cp)
    for r, part in enumerate(parts):
        first, second = zigzag_chunk_ids(cp, r)
        out[first], out[second] = part[0], part[1]
    return torch.stack(out)  # type: ignore[arg-type]


def all_gather_chunks(x_local: torch.Tensor, ctx: AttentionContext, *, what: str
                       ) -> torch.Tensor:
    """[2, ...] (this rank's chunks) -> [2cp, ...] in chunk order, over the CP group."""
    parts = [torch.empty_like(x_local) for _ in range(ctx.cp_size)]
    with collective(what, group="context-parallel"):
        dist.all_gather(parts, x_local.contiguous(), group=ctx.cp_group)
    return order_gathered(parts, ctx.cp_size)


def _chunk_major(x_b2l: torch.Tensor) -> torch.Tensor:
    """[B, 2L, ...] -> [2, B, L, ...] (this rank's two zigzag chunks first)."""
    b, t = x_b2l.shape[:2]
    return x_b2l.reshape(b, 2, t // 2, *x_b2l.shape[2:]).transpose(0, 1)


def _sequence_major(x_nbl: torch.Tensor) -> torch.Tensor:
    """[n, B, L, ...] (chunks in order) -> [B, n * L, ...]."""
    n, b, length = x_nbl.shape[:3]
    return x_nbl.transpose(0, 1).reshape(b, n * length, *x_nbl.shape[3:])


def gather_sequence(x_local: torch.Tensor, ctx: AttentionContext, *, what: str) -> torch.Tensor:
    """This rank's zigzag shard [B, 2L, ...] -> the whole sequence [B, 2cp * L, ...] in order
    (no gradient)."""
    return _sequence_major(all_gather_chunks(_chunk_major(x_local), ctx, what=what))


def _ring_reduce_scatter(parts: list[torch.Tensor], group, rank: int) -> torch.Tensor:
    """Sum over the group of `parts[q]` (every rank's contribution to rank q's part), left on
    rank q: cp - 1 steps round the ring, each sending one part (1/cp of the data) to the next
    rank and adding the one received from the previous, as NCCL's reduce-scatter does. For
    backends without reduce-scatter (gloo)."""
    cp = len(parts)
    ranks = dist.get_process_group_ranks(group)
    send_to, recv_from = ranks[(rank + 1) % cp], ranks[(rank - 1) % cp]
    acc = parts[(rank - 1) % cp].clone()
    for step in range(1, cp):
        incoming = torch.empty_like(acc)
        ops = [dist.P2POp(dist.isend, acc, send_to, group),
               dist.P2POp(dist.irecv, incoming, recv_from, group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        # received: the running sum of part (rank - step - 1) from the previous ranks
        acc = incoming.add_(parts[(rank - step - 1) % cp])
    return acc


def reduce_scatter_sequence(grad: torch.Tensor, ctx: AttentionContext, *, what: str
                            ) -> torch.Tensor:
    """The adjoint of `gather_sequence`: each rank's gradient of the whole sequence
    [B, 2cp * L, ...], summed over the CP group, this rank's two zigzag chunks kept
    [B, 2L, ...]. A reduce-scatter (NCCL), or its ring form where the backend has none; either
    way each rank sends (cp - 1) / cp of one full-length gradient, not the all-reduce's twice
    that."""
    cp = ctx.cp_size
    chunks = grad.chunk(2 * cp, dim=1)
    parts = [torch.cat([chunks[c] for c in zigzag_chunk_ids(cp, r)], dim=1).contiguous()
             for r in range(cp)]
    with collective(what, group="context-parallel"):
        if dist.get_backend(ctx.cp_group) == "nccl":
            out = torch.empty_like(parts[0])
            dist.reduce_scatter(out, parts, group=ctx.cp_group)
            return out
        return _ring_reduce_scatter(parts, ctx.cp_group, ctx.cp_rank)


class _GatherSequence(torch.autograd.Function):
    """`gather_sequence` with its adjoint, `reduce_scatter_sequence`."""

    @staticmethod
    def forward(fctx: Any, x_local: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        fctx.attn_ctx = ctx
        return gather_sequence(x_local, ctx, what="LASP-2H K/V all-gather")

    @staticmethod
    def backward(fctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None]:
        return reduce_scatter_sequence(grad, fctx.attn_ctx,
                                       what="LASP-2H dK/dV reduce-scatter"), None


def _blocks(chunk: int, length: int) -> list[tuple[slice, bool]]:
    """The key ranges a query chunk attends in the gathered sequence: every earlier chunk in
    full, then its own chunk causally (none of them a mask)."""
    out = [(slice(0, chunk * length), False)] if chunk else []
    return out + [(slice(chunk * length, (chunk + 1) * length), True)]


def _visible_blocks(chunks: list[int], length: int, q_doc: Optional[torch.Tensor],
                    k_doc: Optional[torch.Tensor]):
    """(query rows, key columns, causal, their document ids) of every block with a pair a
    query may see, for this rank's query `chunks` of `length` tokens."""
    for i, chunk in enumerate(chunks):
        rows = slice(i * length, (i + 1) * length)
        for cols, causal in _blocks(chunk, length):
            qd = None if q_doc is None else q_doc[:, rows]
            kd = None if k_doc is None else k_doc[:, cols]
            if any_allowed(qd, kd):
                yield rows, cols, causal, qd, kd


class _GatheredAttention(torch.autograd.Function):
    """This rank's query chunks against the gathered sequence, block by block with the fused
    kernels of `attention.blocks` (documents as segments), merged by log-sum-exp: no
    [T/cp, T] mask or score tensor. Tensors are [B, H, T, D] views of [B, T, H, D] ones."""

    @staticmethod
    def forward(fctx: Any, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor,
                chunks: list[int], scale: float, q_doc: Optional[torch.Tensor],
                k_doc: Optional[torch.Tensor], kernels: str) -> torch.Tensor:
        length = q.shape[2] // len(chunks)
        out = torch.zeros(q.shape[:3] + (v_all.shape[-1],), dtype=acc_dtype(q.dtype),
                          device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
        for rows, cols, causal, qd, kd in _visible_blocks(chunks, length, q_doc, k_doc):
            o, l_ = block_forward(q[:, :, rows], k_all[:, :, cols], v_all[:, :, cols],
                                  scale=scale, causal=causal, q_doc_bt=qd, k_doc_bt=kd,
                                  kernels=kernels)
            merge_block_(out[:, :, rows], lse[:, :, rows], o, l_)
        out = out.to(q.dtype)
        fctx.save_for_backward(q, k_all, v_all, out, lse,
                               *([] if q_doc is None else [q_doc, k_doc]))
        fctx.chunks, fctx.scale, fctx.kernels = chunks, scale, kernels
        return out

    @staticmethod
    def backward(fctx: Any, dout: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        q, k_all, v_all, out, lse, *docs = fctx.saved_tensors
        q_doc, k_doc = docs if docs else (None, None)
        chunks = fctx.chunks
        length = q.shape[2] // len(chunks)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k_all), torch.zeros_like(v_all)
        dout = dout.contiguous() if dout.stride(-1) != 1 else dout
        for rows, cols, causal, qd, kd in _visible_blocks(chunks, length, q_doc, k_doc):
            gq, gk, gv = block_backward(
                dout[:, :, rows], q[:, :, rows], k_all[:, :, cols], v_all[:, :, cols],
                out[:, :, rows], lse[:, :, rows], scale=fctx.scale, causal=causal,
                q_doc_bt=qd, k_doc_bt=kd, kernels=fctx.kernels)
            dq[:, :, rows] += gq
            dk[:, :, cols] += gk
            dv[:, :, cols] += gv
        return dq, dk, dv, None, None, None, None, None


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
                        ctx: AttentionContext) -> torch.Tensor:
    """Softmax attention of this rank's queries against the whole sequence's K/V, all-gathered
    over the CP group (LASP-2H's softmax layers). Shapes as in attention.types."""
    if ctx.cp_size == 1:
        return dense_attention(q, k, v, meta, ctx)
    k_all, v_all = _GatherSequence.apply(k, ctx), _GatherSequence.apply(v, ctx)
    doc_all = (None if meta.doc_ids_bt is None else
               gather_sequence(meta.doc_ids_bt, ctx, what="LASP-2H document-id all-gather"))
    scale = meta.softmax_scale if meta.softmax_scale is not None else q.shape[-1] ** -0.5
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    out = _GatheredAttention.apply(t(q), t(k_all), t(v_all), local_chunk_ids(ctx), scale,
                                   meta.doc_ids_bt, doc_all, ctx.kernels)
    return t(out)


def allgather_comm(s: AttentionShape, *, c: int, link: Link, fwd_attention_s: float,
                   attention: Any) -> tuple[float, None]:
    """Forward K and V gathered; backward dK and dV of the whole sequence reduce-scattered."""
    if c <= 1:
        return 0.0, None
    _, kv = kv_bytes(s, c)
    return all_gather(kv, c, link) + reduce_scatter(c * kv, c, link), None


SPEC = BackendSpec(name="allgather", kind="softmax", shards_sequence=True,
                   build=lambda attention, model: allgather_attention,
                   forward_flops=softmax_forward_flops, comm=allgather_comm)
