"""Ring attention over the context-parallel group, zigzag layout.

Legend: B batch, H heads (Hq query, Hkv key/value), T this rank's local length (two zigzag
chunks of T/2), D head dim; internal tensors are `[B, H, T, D]`, LSE `[B, H, T]` fp32.

Forward: K/V (and document ids) travel around the ring; while the next block is in flight
(async isend/irecv) the current one is attended and merged by LSE in fp32. With the zigzag
layout (rank r holds chunks r and 2*CP-1-r), the block that came from rank s is:
  s == r: causal over the local sequence;
  s <  r: every local query vs the first half of the keys (the second half is in the future);
  s >  r: the second half of the queries vs every key (the first half sees nothing);
so every rank does the same work and fully masked blocks are never computed.

Backward: K/V travel the ring again; each rank computes its block's dQ (kept) and dK/dV,
which travel with their block and reach the owner after a full cycle. Block gradients use
the merged out and LSE, so their sum is the exact gradient of dense attention.

Memory and copies: every `[B, H, T, D]` tensor here is a transposed view of a contiguous
`[B, T, H, D]` one (the caller's layout, which ATen's CPU flash kernel reads through strides
and also uses for its outputs and gradients), so nothing is transposed into a copy, K/V and
dK/dV go on the wire as the contiguous `[B, T, H, D]` tensors, and the results go back to
autograd without a copy. The diagonal block (step 0) covers every local row and column, so
its output and gradients become the accumulators, and later blocks merge into them in place.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from longtrain.attention.blocks import (acc_dtype, any_allowed, block_backward, block_forward,
                                        merge_block_)
from longtrain.attention.dense import softmax_forward_flops
from longtrain.attention.types import AttentionContext, AttentionMeta, BackendSpec
from longtrain.parallel.collective_cost import AttentionShape, Link, RingDetail, ring_exposed
from longtrain.parallel.watch import collective


class RingComm:
    """Send to the next rank and receive from the previous one, asynchronously."""

    def __init__(self, group) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        ranks = dist.get_process_group_ranks(group)
        self.next = ranks[(self.rank + 1) % self.world]
        self.prev = ranks[(self.rank - 1) % self.world]
        self._pending: list = []

    def start(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Post the exchange of `tensors` (`[B, H, T, D]` views as above, or `[B, T]` ids);
        returns receive buffers of the same shapes and layouts (valid after `wait`)."""
        wire = [_wire(t) for t in tensors]
        recv = [torch.empty_like(w) for w in wire]
        ops = [dist.P2POp(dist.isend, w, self.next, self.group) for w in wire]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in recv]
        self._pending += dist.batch_isend_irecv(ops)
        return [r.transpose(1, 2) if t.dim() == 4 else r for t, r in zip(tensors, recv)]

    def wait(self) -> None:
        with collective("ring attention K/V send/recv", group="context-parallel"):
            for req in self._pending:
                req.wait()
        self._pending = []


def _wire(t: torch.Tensor) -> torch.Tensor:
    """The contiguous tensor that goes on the wire: `[B, T, H, D]` for a `[B, H, T, D]` view."""
    if t.dim() == 4:
        t = t.transpose(1, 2)
    return t.contiguous()


def _bhtd(x_bthd: torch.Tensor) -> torch.Tensor:
    """`[B, H, T, D]` view of a contiguous `[B, T, H, D]` tensor (copies only if not contiguous)."""
    return x_bthd.contiguous().transpose(1, 2)


def _block_plan(src: int, rank: int, t: int, *, causal: bool) -> tuple[slice, slice, bool]:
    """(query rows, key columns, causal-within-block) of the block from rank `src`."""
    everything = slice(0, t)
    if not causal:
        return everything, everything, False
    if src == rank:
        return everything, everything, True
    if src < rank:
        return everything, slice(0, t // 2), False
    return slice(t // 2, t), everything, False


def _doc(doc_bt: Optional[torch.Tensor], sl: slice) -> Optional[torch.Tensor]:
    return None if doc_bt is None else doc_bt[:, sl]


def _with_doc(tensors: list[torch.Tensor], doc_bt: Optional[torch.Tensor]) -> list[torch.Tensor]:
    return tensors if doc_bt is None else [*tensors, doc_bt]


def _receive(comm: RingComm, incoming: list[torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Wait for the next block sent by `_with_doc`: (k, v, document ids or None)."""
    comm.wait()
    return incoming[0], incoming[1], incoming[2] if len(incoming) > 2 else None


def ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group, scale: float,
                 causal: bool, doc_bt: Optional[torch.Tensor], kernels: str = "auto"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, T, D], lse [B, Hq, T]) in the accumulation dtype, on `[B, H, T, D]` inputs."""
    comm = RingComm(group)
    acc = acc_dtype(q.dtype)
    out: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
    k_cur, v_cur, kdoc_cur = k, v, doc_bt
    for step in range(comm.world):
        if step + 1 < comm.world:
            incoming = comm.start(_with_doc([k_cur, v_cur], kdoc_cur))
        src = (comm.rank - step) % comm.world
        rows, cols, blk_causal = _block_plan(src, comm.rank, q.shape[2], causal=causal)
        q_doc, k_doc = _doc(doc_bt, rows), _doc(kdoc_cur, cols)
        if any_allowed(q_doc, k_doc):
            o_blk, lse_blk = block_forward(q[:, :, rows], k_cur[:, :, cols], v_cur[:, :, cols],
                                           scale=scale, causal=blk_causal, q_doc_bt=q_doc,
                                           k_doc_bt=k_doc, kernels=kernels)
            if out is None and rows == slice(0, q.shape[2]):
                out, lse = o_blk.to(acc), lse_blk
            else:
                if out is None:
                    out = _zeros_like_bhtd(q, acc)
                    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
                merge_block_(out[:, :, rows], lse[:, :, rows], o_blk, lse_blk)
            # free the block before the next receive buffers are allocated
            del o_blk, lse_blk
        if step + 1 < comm.world:
            k_cur, v_cur, kdoc_cur = _receive(comm, incoming)
            del incoming
    return out, lse


def _zeros_like_bhtd(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    b, h, t, d = like.shape
    return _bhtd(torch.zeros(b, t, h, d, dtype=dtype, device=like.device))


def _accumulate(acc: Optional[torch.Tensor], idx: slice, blk: torch.Tensor, like: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """acc[:, :, idx] += blk; the first block becomes the accumulator when it covers `like`."""
    if acc is None:
        if idx == slice(0, like.shape[2]):
            return blk.to(dtype)
        acc = _zeros_like_bhtd(like, dtype)
    acc[:, :, idx] += blk
    return acc


def ring_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, *, group, scale: float, causal: bool,
                  doc_bt: Optional[torch.Tensor], kernels: str = "auto"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in `[B, H, T, D]`, accumulation dtype, for this rank's q and own k/v."""
    kv_comm, dkv_comm = RingComm(group), RingComm(group)
    t = q.shape[2]
    acc = acc_dtype(q.dtype)
    dq: Optional[torch.Tensor] = None
    k_cur, v_cur, kdoc_cur = k, v, doc_bt
    # dK/dV of the block we hold, accumulated over the ranks that held it before us
    dk_acc: Optional[torch.Tensor] = None
    dv_acc: Optional[torch.Tensor] = None
    # receive buffers of the dK/dV exchange posted at the end of the previous step
    dkv_in: list[torch.Tensor] = []
    for step in range(kv_comm.world):
        if step + 1 < kv_comm.world:
            incoming = kv_comm.start(_with_doc([k_cur, v_cur], kdoc_cur))
        src = (kv_comm.rank - step) % kv_comm.world
        rows, cols, blk_causal = _block_plan(src, kv_comm.rank, t, causal=causal)
        q_doc, k_doc = _doc(doc_bt, rows), _doc(kdoc_cur, cols)
        if step > 0:
            # The accumulated dK/dV of this block, from the previous holder. Waiting before the
            # block (not after it) frees the dK/dV we sent before the block's gradients are
            # allocated: 2 fewer K/V-sized buffers at the peak, for one dK/dV transfer that no
            # compute hides (a few ms next to seconds of compute at 16K on CPU).
            dkv_comm.wait()
            dk_acc, dv_acc = dkv_in
            dkv_in = []
        blk = None
        if any_allowed(q_doc, k_doc):
            blk = block_backward(dout[:, :, rows], q[:, :, rows], k_cur[:, :, cols],
                                 v_cur[:, :, cols], out[:, :, rows], lse[:, :, rows], scale=scale,
                                 causal=blk_causal, q_doc_bt=q_doc, k_doc_bt=k_doc,
                                 kernels=kernels)
        if blk is not None:
            dq = _accumulate(dq, rows, blk[0], q, acc)
            dk_acc = _accumulate(dk_acc, cols, blk[1], k_cur, acc)
            dv_acc = _accumulate(dv_acc, cols, blk[2], v_cur, acc)
            del blk
        if dk_acc is None:
            dk_acc, dv_acc = _zeros_like_bhtd(k_cur, acc), _zeros_like_bhtd(v_cur, acc)
        # pass them on with the block; after the last step this returns them to their owner
        if kv_comm.world > 1:
            dkv_in = dkv_comm.start([dk_acc, dv_acc])
            del dk_acc, dv_acc
        if step + 1 < kv_comm.world:
            k_cur, v_cur, kdoc_cur = _receive(kv_comm, incoming)
            del incoming
    if dq is None:
        dq = _zeros_like_bhtd(q, acc)
    if kv_comm.world == 1:
        return dq, dk_acc, dv_acc
    dkv_comm.wait()
    dk, dv = dkv_in
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_bthd, k_bthd, v_bthd, doc_bt, group, scale, causal, kernels):
        # [B, H, T, D] views of the [B, T, H, D] inputs: no copy (see the module docstring)
        q, k, v = (_bhtd(x) for x in (q_bthd, k_bthd, v_bthd))
        out_acc, lse = ring_forward(q, k, v, group=group, scale=scale, causal=causal,
                                    doc_bt=doc_bt, kernels=kernels)
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, doc_bt)
        ctx.group, ctx.scale, ctx.causal, ctx.kernels = group, scale, causal, kernels
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, dout_bthd):
        q, k, v, out, lse, doc_bt = ctx.saved_tensors
        dq, dk, dv = ring_backward(_bhtd(dout_bthd), q, k, v, out, lse, group=ctx.group,
                                   scale=ctx.scale, causal=ctx.causal, doc_bt=doc_bt,
                                   kernels=ctx.kernels)
        cast = lambda g, like: g.to(like.dtype).transpose(1, 2)  # noqa: E731
        return cast(dq, q), cast(dk, k), cast(dv, v), None, None, None, None, None


def ring_attention_fn(q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor, *,
                      group, causal: bool = True, scale: Optional[float] = None,
                      doc_bt: Optional[torch.Tensor] = None,
                      kernels: str = "auto") -> torch.Tensor:
    """Ring attention on this rank's zigzag shard.

    q [B, T, Hq, D], k/v [B, T, Hkv, D] (GQA: K/V travel with Hkv heads), doc_bt [B, T] int64
    document ids of the local tokens (None: one document). Returns [B, T, Hq, D] in q's dtype.
    """
    scale = q_bthd.shape[-1] ** -0.5 if scale is None else scale
    return _RingAttention.apply(q_bthd, k_bthd, v_bthd, doc_bt, group, scale, causal, kernels)


def ring_attention(q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor,
                   meta: AttentionMeta, ctx: AttentionContext) -> torch.Tensor:
    """`attention=ring`: the attention backend interface (shapes as in attention.types)."""
    if ctx.layout != "zigzag":
        raise ValueError(f"ring attention needs the zigzag layout, got {ctx.layout!r}")
    return ring_attention_fn(q_bthd, k_bthd, v_bthd, group=ctx.cp_group, causal=meta.causal,
                             scale=meta.softmax_scale, doc_bt=meta.doc_ids_bt,
                             kernels=ctx.kernels)


def kv_bytes(s: AttentionShape, c: int) -> tuple[float, float]:
    """(q, k+v) bytes one rank holds of one layer: its T/c tokens, its heads."""
    local = s.batch * s.seq_len / c * s.head_dim * s.elt
    return local * s.q_heads, 2 * local * s.kv_heads


def ring_comm(s: AttentionShape, *, c: int, link: Link, fwd_attention_s: float, attention: Any
              ) -> tuple[float, Optional[RingDetail]]:
    """K/V rotated c-1 times each way, overlapping the blocks' compute; the fp32 dK/dV
    accumulators travel c times, exposed (longtrain.planning.costmodel's docstring)."""
    if c <= 1:
        return 0.0, None
    _, kv = kv_bytes(s, c)
    return ring_exposed(kv, fwd_attention_s, c, link, kv * 4 / s.elt)


SPEC = BackendSpec(name="ring", kind="softmax", shards_sequence=True,
                   build=lambda attention, model: ring_attention,
                   forward_flops=softmax_forward_flops, comm=ring_comm)
