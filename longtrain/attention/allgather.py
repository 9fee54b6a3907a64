"""All-gather attention (LASP-2H's softmax layers) and the sequence gather it is built on.

Legend: B batch, T local sequence length (this rank's two zigzag chunks of L tokens each),
Hq / Hkv query / key-value heads, D head dim, n = 2 * cp chunks.

`allgather`: every rank all-gathers K/V (and document ids) over the CP group and computes
its own queries against the whole sequence, the causal / document mask applied; backward
all-reduces the full-length dK/dV and keeps this rank's chunks (gloo has no reduce-scatter).
`gather_sequence` also serves s2's document ids and the LASP chunk bookkeeping.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longtrain.attention.dense import dense_attention, softmax_forward_flops
from longtrain.attention.ring import kv_bytes
from longtrain.attention.types import AttentionContext, AttentionMeta, BackendSpec
from longtrain.parallel.collective_cost import AttentionShape, Link, all_gather, all_reduce
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


class _GatherSequence(torch.autograd.Function):
    """`gather_sequence` with its adjoint: every rank's gradient of the whole sequence summed
    over the CP group, this rank's chunks kept (an all-reduce: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(fctx: Any, x_local: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        fctx.attn_ctx = ctx
        return gather_sequence(x_local, ctx, what="LASP-2H K/V all-gather")

    @staticmethod
    def backward(fctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None]:
        ctx = fctx.attn_ctx
        grad = grad.contiguous()
        with collective("LASP-2H dK/dV all-reduce", group="context-parallel"):
            dist.all_reduce(grad, group=ctx.cp_group)
        chunks = grad.chunk(2 * ctx.cp_size, dim=1)
        first, second = zigzag_chunk_ids(ctx.cp_size, ctx.cp_rank)
        return torch.cat([chunks[first], chunks[second]], dim=1), None


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
                        ctx: AttentionContext) -> torch.Tensor:
    """Softmax attention of this rank's queries against the whole sequence's K/V, all-gathered
    over the CP group (LASP-2H's softmax layers). Shapes as in attention.types."""
    if ctx.cp_size == 1:
        return dense_attention(q, k, v, meta, ctx)
    k_all, v_all = _GatherSequence.apply(k, ctx), _GatherSequence.apply(v, ctx)
    length = q.shape[1] // 2
    q_index = torch.cat([torch.arange(c * length, (c + 1) * length, device=q.device)
                         for c in local_chunk_ids(ctx)])
    allowed = torch.arange(k_all.shape[1], device=q.device)[None, :] <= q_index[:, None]
    allowed = allowed[None].expand(q.shape[0], -1, -1)
    if meta.doc_ids_bt is not None:
        doc_all = gather_sequence(meta.doc_ids_bt, ctx, what="LASP-2H document-id all-gather")
        allowed = allowed & (meta.doc_ids_bt[:, :, None] == doc_all[:, None, :])
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
    mask.masked_fill_(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k_all.transpose(1, 2),
                                         v_all.transpose(1, 2), attn_mask=mask[:, None],
                                         scale=meta.softmax_scale,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def allgather_comm(s: AttentionShape, *, c: int, link: Link, fwd_attention_s: float,
                   attention: Any) -> tuple[float, None]:
    """Forward K and V gathered; backward dK and dV of the whole sequence all-reduced."""
    if c <= 1:
        return 0.0, None
    _, kv = kv_bytes(s, c)
    return all_gather(kv, c, link) + all_reduce(c * kv, c, link), None


def masked_share(seq_len: int, c: int) -> float:
    """The mask is applied to all T/c x T (query, key) pairs of a rank instead of skipping
    the future: T^2 over the causal T(T+1)/2."""
    if c <= 1:
        return 1.0
    return seq_len * seq_len / (seq_len * (seq_len + 1) / 2)


SPEC = BackendSpec(name="allgather", kind="softmax", shards_sequence=True,
                   build=lambda attention, model: allgather_attention,
                   forward_flops=softmax_forward_flops, comm=allgather_comm,
                   compute_factor=masked_share)
