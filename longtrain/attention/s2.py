"""S2-Attention: heterogeneous per-head context sharding (block-sparse causal attention), on
one device and under context parallelism.

Legend: B batch, T local tokens, Hq query heads, Hkv key/value heads, D head dim, bs the
pattern's block size, L a CP chunk's length (the zigzag layout gives rank r chunks r and
2cp-1-r of the sequence).

Each head attends to a dense window of `local_blocks` recent blocks and, beyond it, to every
`vert_stride`-th block at a head-dependent phase (`longtrain_kernels.s2_attn.S2Pattern`,
defined on the *global* head index so every TP layout computes the same function); the union
over heads covers the whole causal context.

Under CP no ring is needed: which key blocks a rank's queries can ever see is known from the
pattern, so each rank receives exactly those blocks of the other ranks' K/V, point to point
(a far chunk contributes only its vertical blocks of this rank's heads, and nothing from
blocks no local head needs), computes its chunks with the block-sparse kernel against them,
and returns their K/V gradients to the owners in backward. The rank keeps only those blocks:
a compact buffer (its own blocks and the received ones, in global order) that the kernel
reads through `k_blocks`, so a sparse layer's K/V per rank is about T / (CP * vert_stride)
plus the window, not the whole prefix.
"""

from __future__ import annotations

import bisect
import functools
from typing import Any, Optional

import torch
import torch.distributed as dist

from longtrain.attention.dense import dense_attention, softmax_forward_flops
from longtrain.attention.ring import ring_attention, ring_comm
from longtrain.attention.types import AttentionContext, AttentionFn, AttentionMeta, BackendSpec
from longtrain.observability.flops import layer_attention_forward
from longtrain.parallel.layout import zigzag_chunk_ids
from longtrain.parallel.watch import collective
from longtrain_kernels.s2_attn import S2Pattern
from longtrain_kernels.s2_attn import s2_attention as kernel


def s2_pattern(cfg: Any, num_heads: int):
    """The kernel's pattern from `attention.s2` and the model's global head count."""
    return S2Pattern(num_heads=num_heads, block_size=cfg.block_size,
                     local_blocks=cfg.local_blocks, vert_stride=cfg.vert_stride,
                     homo_head=cfg.homo_head, num_dense_heads=cfg.num_dense_heads)


def dense_layers(cfg: Any, num_layers: int) -> list[bool]:
    """Which layers of an s2 model stay dense: the first `dense_first`, and every
    `dense_every`-th (layers dense_every-1, 2*dense_every-1, ...; 0: none)."""
    return [i < cfg.dense_first or (cfg.dense_every > 0 and (i + 1) % cfg.dense_every == 0)
            for i in range(num_layers)]


# --------------------------------------------------------------------------- the exchange plan

@functools.lru_cache(maxsize=64)
def _plan(pattern: Any, heads: tuple[int, ...], cp: int, chunk_blocks: int
          ) -> dict[int, tuple[int, ...]]:
    """{rank: the global key blocks its queries can see through any of `heads`} (every rank of
    a CP group holds the same heads)."""
    need: dict[int, tuple[int, ...]] = {}
    for r in range(cp):
        blocks: set[int] = set()
        for c in zigzag_chunk_ids(cp, r):
            for i in range(c * chunk_blocks, (c + 1) * chunk_blocks):
                for g in heads:
                    blocks.update(pattern.key_blocks(i, g))
        need[r] = tuple(sorted(blocks))
    return need


def _owner(block: int, *, cp: int, chunk_blocks: int) -> int:
    c = block // chunk_blocks
    return c if c < cp else 2 * cp - 1 - c


def _local_offset(block: int, rank: int, *, cp: int, chunk_blocks: int) -> int:
    """Index of global `block` in its owner's local [2L] shard, in blocks."""
    first, _ = zigzag_chunk_ids(cp, rank)
    c = block // chunk_blocks
    return block % chunk_blocks + (0 if c == first else chunk_blocks)


class _Exchange:
    """Who sends which blocks to whom, for one rank: `send[peer]` and `recv[peer]` are lists of
    (global block, local block offset on the owner). `blocks` are the global key blocks this
    rank's heads read, ascending (its own blocks among them: every query block reads its
    diagonal); the compact K/V buffer holds exactly these, `own_slots` / `own_offsets` place
    this rank's blocks in it and `recv_slots[peer]` the received ones; `send_offsets[peer]`
    are the local blocks sent to a peer."""

    def __init__(self, pattern: Any, heads: tuple[int, ...], ctx: AttentionContext,
                 chunk_blocks: int) -> None:
        cp, rank = ctx.cp_size, ctx.cp_rank
        need = _plan(pattern, heads, cp, chunk_blocks)
        owner = functools.partial(_owner, cp=cp, chunk_blocks=chunk_blocks)
        offset = functools.partial(_local_offset, cp=cp, chunk_blocks=chunk_blocks)
        self.send = {p: [(b, offset(b, rank)) for b in need[p] if owner(b) == rank]
                     for p in range(cp) if p != rank}
        self.recv = {p: [(b, offset(b, p)) for b in need[rank] if owner(b) == p]
                     for p in range(cp) if p != rank}
        self.blocks = need[rank]
        slot = {b: n for n, b in enumerate(self.blocks)}
        own = [b for b in self.blocks if owner(b) == rank]
        self.own_slots = torch.tensor([slot[b] for b in own], dtype=torch.long)
        self.own_offsets = torch.tensor([offset(b, rank) for b in own], dtype=torch.long)
        self.recv_slots = {p: torch.tensor([slot[b] for b, _ in blocks], dtype=torch.long)
                           for p, blocks in self.recv.items()}
        self.send_offsets = {p: torch.tensor([o for _, o in blocks], dtype=torch.long)
                             for p, blocks in self.send.items()}
        self.ranks = dist.get_process_group_ranks(ctx.cp_group)
        self.ctx = ctx

    def blocks_received(self) -> int:
        return sum(len(v) for v in self.recv.values())

    def blocks_before(self, block: int) -> int:
        """How many of `blocks` lie before global `block`."""
        return bisect.bisect_left(self.blocks, block)


def _p2p(plan: _Exchange, outgoing: dict[int, torch.Tensor], incoming: dict[int, torch.Tensor],
         *, what: str) -> None:
    ops = []
    for peer, t in outgoing.items():
        if t.numel():
            ops.append(dist.P2POp(dist.isend, t.contiguous(), plan.ranks[peer], plan.ctx.cp_group))
    for peer, t in incoming.items():
        if t.numel():
            ops.append(dist.P2POp(dist.irecv, t, plan.ranks[peer], plan.ctx.cp_group))
    if not ops:
        return
    with collective(what, group="context-parallel"):
        for req in dist.batch_isend_irecv(ops):
            req.wait()


def _blocked(x_bt_: torch.Tensor, bs: int) -> torch.Tensor:
    """[B, T, ...] -> [B, T / bs, bs, ...] (a view)."""
    return x_bt_.view(x_bt_.shape[0], -1, bs, *x_bt_.shape[2:])


def _collect(x_local: torch.Tensor, plan: _Exchange, bs: int, *, what: str) -> torch.Tensor:
    """This rank's zigzag shard [B, 2L, ...] -> the compact [B, len(plan.blocks) * bs, ...]
    buffer of the blocks its heads read (its own and the received ones), in global order."""
    b, rest = x_local.shape[0], x_local.shape[2:]
    dev = x_local.device
    compact = x_local.new_empty((b, len(plan.blocks) * bs, *rest))
    slots = _blocked(compact, bs)
    slots[:, plan.own_slots.to(dev)] = _blocked(x_local, bs)[:, plan.own_offsets.to(dev)]
    outgoing = {p: _blocked(x_local, bs)[:, offsets.to(dev)].reshape(b, -1, *rest)
                for p, offsets in plan.send_offsets.items()}
    incoming = {p: x_local.new_empty((b, len(blocks) * bs, *rest))
                for p, blocks in plan.recv.items()}
    _p2p(plan, outgoing, incoming, what=what)
    for p in plan.recv:
        slots[:, plan.recv_slots[p].to(dev)] = _blocked(incoming[p], bs)
    return compact


class _GatherNeeded(torch.autograd.Function):
    """This rank's zigzag K/V shard -> the compact buffer of the blocks its queries can see
    (`_collect`). Backward returns the received blocks' gradients to their owners, who add them
    to their own."""

    @staticmethod
    def forward(fctx: Any, kv_local: torch.Tensor, plan: _Exchange, bs: int) -> torch.Tensor:
        fctx.plan, fctx.bs, fctx.local_len = plan, bs, kv_local.shape[1]
        return _collect(kv_local, plan, bs, what="S2 needed K/V blocks send/recv")

    @staticmethod
    def backward(fctx: Any, grad_compact: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        plan, bs = fctx.plan, fctx.bs
        dev = grad_compact.device
        b, rest = grad_compact.shape[0], grad_compact.shape[2:]
        slots = _blocked(grad_compact, bs)
        grad_local = grad_compact.new_zeros((b, fctx.local_len, *rest))
        local = _blocked(grad_local, bs)
        local[:, plan.own_offsets.to(dev)] = slots[:, plan.own_slots.to(dev)]
        # the gradients of the blocks this rank received go back to their owners
        outgoing = {p: slots[:, plan.recv_slots[p].to(dev)].reshape(b, -1, *rest)
                    for p in plan.recv}
        incoming = {p: grad_compact.new_empty((b, len(blocks) * bs, *rest))
                    for p, blocks in plan.send.items()}
        _p2p(plan, outgoing, incoming, what="S2 K/V gradient blocks send/recv")
        for p, offsets in plan.send_offsets.items():
            local.index_add_(1, offsets.to(dev), _blocked(incoming[p], bs))
        return grad_local, None, None


# --------------------------------------------------------------------------- the backend

def make_s2_attention(pattern: Any) -> AttentionFn:
    """`attention=s2` for one pattern (shapes as in attention.types; the rank's first global
    head is `meta.head_offset`)."""

    def s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
                     ctx: AttentionContext) -> torch.Tensor:
        doc = meta.doc_ids_bt
        common = dict(head_offset=meta.head_offset, scale=meta.softmax_scale,
                      backend=ctx.kernels)
        bs = pattern.block_size
        if ctx.cp_size == 1:
            t = q.shape[1]
            pad = -t % bs
            if pad:
                # a partial last block (e.g. an eval prompt): padded at the end, where causal
                # attention keeps it from every real row, and cut off again
                q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
                if doc is not None:
                    doc = torch.cat([doc, (doc[:, -1:] + 1).expand(-1, pad)], dim=1)
            out = kernel(q, k, v, pattern, q_start=0, q_doc=doc, k_doc=doc, **common)
            return out[:, :t]
        length = q.shape[1] // 2
        if length % bs:
            raise ValueError(f"attention=s2 under context parallelism needs whole blocks per "
                             f"chunk: {q.shape[1]} local tokens make chunks of {length}, not "
                             f"a multiple of attention.s2.block_size={bs} (use a sequence "
                             f"length that is a multiple of 2 * cp * {bs})")
        heads = tuple(range(meta.head_offset, meta.head_offset + q.shape[2]))
        plan = _Exchange(pattern, heads, ctx, length // bs)
        # only the blocks this rank's heads read are kept (for the backward too)
        k_have = _GatherNeeded.apply(k, plan, bs)
        v_have = _GatherNeeded.apply(v, plan, bs)
        doc_have = None if doc is None else _collect(doc, plan, bs,
                                                     what="S2 document-id blocks send/recv")
        outs = []
        for n, c in enumerate(zigzag_chunk_ids(ctx.cp_size, ctx.cp_rank)):
            rows = slice(n * length, (n + 1) * length)
            m = plan.blocks_before((c + 1) * (length // bs))
            outs.append(kernel(q[:, rows], k_have[:, :m * bs], v_have[:, :m * bs], pattern,
                               q_start=c * length, k_blocks=plan.blocks[:m],
                               q_doc=None if doc is None else doc[:, rows],
                               k_doc=None if doc_have is None else doc_have[:, :m * bs],
                               **common))
        return torch.cat(outs, dim=1)

    return s2_attention


def dense_or_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
                  ctx: AttentionContext) -> torch.Tensor:
    """The dense layers of an s2 model: dense attention, ring attention under CP."""
    return (dense_attention if ctx.cp_size == 1 else ring_attention)(q, k, v, meta, ctx)


def s2_needed_fraction(pattern: Any, heads: tuple[int, ...], *, cp: int, chunk_blocks: int
                       ) -> float:
    """The fraction of other ranks' K/V blocks a rank receives (1.0 = a full ring's worth),
    averaged over ranks: what sparsity-aware CP saves in communication."""
    need = _plan(pattern, heads, cp, chunk_blocks)
    others = 2 * chunk_blocks * (cp - 1)
    got = [sum(1 for b in need[r] if _owner(b, cp=cp, chunk_blocks=chunk_blocks) != r)
           for r in range(cp)]
    return sum(got) / (len(got) * others) if others else 0.0


# --------------------------------------------------------------------------- the specs

def s2_problems(cfg: Any) -> list[str]:
    """attention=s2: the pattern's fields, whether its heads cover the whole causal context,
    and whether the sequence splits into whole blocks per CP chunk."""
    s2 = cfg.attention.s2
    out = []
    for name in ("dense_first", "dense_every"):
        if getattr(s2, name) < 0:
            out.append(f"attention.s2.{name}={getattr(s2, name)} must be >= 0")
    pattern = s2_pattern(s2, cfg.model.num_heads)
    found = pattern.problems()
    if found:
        return out + found
    chunk = cfg.data.seq_len // (2 * cfg.parallel.cp if cfg.parallel.cp > 1 else 1)
    if cfg.data.seq_len % (2 * cfg.parallel.cp if cfg.parallel.cp > 1 else 1) or \
            chunk % s2.block_size:
        unit = s2.block_size * (2 * cfg.parallel.cp if cfg.parallel.cp > 1 else 1)
        out.append(f"data.seq_len={cfg.data.seq_len} must be a multiple of "
                   f"attention.s2.block_size={s2.block_size}"
                   + (f" * 2 * parallel.cp={cfg.parallel.cp}" if cfg.parallel.cp > 1 else "")
                   + f" = {unit} (whole blocks per context-parallel chunk)")
    elif pattern.uncovered(cfg.data.seq_len // s2.block_size):
        out.append(f"attention.s2: the heads' vertical phases leave parts of the context unseen "
                   f"(model.num_heads={cfg.model.num_heads} < vert_stride={s2.vert_stride}"
                   f"{' with homo_head' if s2.homo_head else ''}, no dense heads); set "
                   f"attention.s2.num_dense_heads >= 1, a smaller vert_stride, or more heads")
    return out


def s2_forward_flops(*, t: int, heads: int, head_dim: int, attention: Any) -> float:
    """The (query, key) pairs the pattern visits, over all `heads` (global) heads."""
    return layer_attention_forward("s2", t=t, heads=heads, head_dim=head_dim,
                                   pattern=s2_pattern(attention.s2, heads))


# the layers `attention.s2` keeps dense: dense attention, or ring under CP (not a
# user-facing backend: it is only ever chosen through SPEC.layer_specs)
DENSE_LAYER = BackendSpec(
    name="s2_dense", kind="softmax", shards_sequence=True,
    build=lambda attention, model: dense_or_ring, forward_flops=softmax_forward_flops,
    comm=ring_comm, describe=lambda cp: "dense" if cp == 1 else "ring (s2 dense layer)")

SPEC = BackendSpec(
    name="s2", kind="softmax", shards_sequence=True,
    build=lambda attention, model: make_s2_attention(s2_pattern(attention.s2, model.num_heads)),
    forward_flops=s2_forward_flops, comm=ring_comm, problems=s2_problems,
    layer_specs=lambda attention, n: [DENSE_LAYER if dense else None
                                      for dense in dense_layers(attention.s2, n)])

