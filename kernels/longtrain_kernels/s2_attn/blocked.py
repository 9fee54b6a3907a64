"""PyTorch block-sparse S2-Attention: forward and hand-written backward, skipping blocks.

Legend: B batch, Tq query rows, Tk keys, H query heads, Hkv key/value heads, D head dim,
bs the pattern's block size, L local_blocks, nk = Tk / bs key blocks. Per chunk of query
blocks and group of heads: n query blocks, G heads, u vertical blocks (the most any row of
the chunk reads; U for the whole call). `q_bhtd` [B, H, Tq, D], `k_bhtd` [B, Hkv, Tk, D], `lse_bht` [B, H, Tq].

What query block i of a head reads splits into two parts:
- the local window, blocks i-L+1 .. i: gathered per chunk, one [bs, L*bs] score tile per query
  block, the causal triangle on its last slot;
- the vertical blocks before the window, j = r, r + s, r + 2s, ... < i-L+1 for the head's phase
  r and stride s: gathered once per call into a compact [U*bs, D] operand per head, of which
  every query block of a chunk reads a prefix, so a chunk's vertical scores are one plain
  [n*bs, u*bs] matmul per head (slots past a row's own prefix are masked) and no vertical block
  is copied per query block.
A dense head is the same schedule with s = 1 and r = 0 (every block before the window).
Both parts share one softmax (joint max and sum); nothing [T, T]-sized exists, and a sparse
head costs O(T * (L * bs + T / vert_stride)). The backward recomputes the probabilities from
the saved out and lse (flash style); window gradients are scattered into the key blocks per
chunk, vertical ones gathered in the compact operand and folded in once at the end.
`plan` is the exact schedule both directions run; `plan_tiles` counts its block products.
No autograd here (see function.py).

`k_blocks` (optional, ascending) names the global key block each block of k / v holds: a
context-parallel rank passes only the blocks its heads read, and every global block index is
turned into its slot through a lookup (`_Call.slot`). Blocks absent from k are read only by
padding or masked slots, which the lookup sends to slot 0.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from longtrain_kernels.s2_attn.pattern import S2Pattern

# Elements of one chunk's score tensors: bounds the transient memory of both directions.
_CHUNK_ELEMENTS = 1 << 22
_MIN_CHUNK_BLOCKS = 8


class Chunk(NamedTuple):
    """Local query blocks [q0, q1) of a group; row q reads the first `counts[q - q0]` of the
    group's vertical blocks, and the chunk computes the first `u` (= max(counts))."""

    q0: int
    q1: int
    counts: torch.Tensor
    u: int


class Group(NamedTuple):
    """Local heads sharing a vertical stride (dense heads: 1), with their phases."""

    heads: torch.Tensor  # [G] local query heads
    stride: int
    phase: torch.Tensor  # [G] r: vertical blocks are r, r + stride, ...
    n_vertical: int  # compact vertical blocks the last query block reads (the operand size)
    chunks: tuple[Chunk, ...]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Compute precision: float64 for float64 inputs (tests), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _vertical_counts(blocks: torch.Tensor, *, local: int, stride: int, phase: int
                     ) -> torch.Tensor:
    """How many of j = phase, phase + stride, ... lie before each query block's window."""
    lo = (blocks - local + 1).clamp(min=0)
    return ((lo - phase + stride - 1) // stride).clamp(min=0)


@functools.lru_cache(maxsize=64)
def plan(pattern: S2Pattern, *, batch: int, num_q_heads: int, head_offset: int,
         q_block0: int, n_q_blocks: int) -> tuple[Group, ...]:
    """Groups of local heads, each with chunks of query blocks covering all of them."""
    bs, local = pattern.block_size, pattern.local_blocks
    blocks = q_block0 + torch.arange(n_q_blocks)
    heads = range(num_q_heads)
    dense = [h for h in heads if pattern.is_dense_head(head_offset + h)]
    sparse = [h for h in heads if not pattern.is_dense_head(head_offset + h)]
    out: list[Group] = []
    for members, stride in ((dense, 1), (sparse, pattern.vert_stride)):
        if not members:
            continue
        phases = [0 if stride == 1 else pattern.vertical_phase(head_offset + h) for h in members]
        # Heads of one group differ in phase by less than a stride: their counts differ by at
        # most one, so the group's rows use the smallest phase's (largest) counts.
        counts = _vertical_counts(blocks, local=local, stride=stride, phase=min(phases))
        per_block = batch * len(members) * bs * bs * (int(counts[-1]) + local)
        # Rows of a chunk are padded to its longest vertical prefix, which grows a block per
        # `stride` query blocks, so short chunks keep the padding small.
        cap = max(_MIN_CHUNK_BLOCKS, stride)
        n = max(1, min(cap, _CHUNK_ELEMENTS // per_block, n_q_blocks))
        chunks = tuple(Chunk(q0, min(q0 + n, n_q_blocks), counts[q0:q0 + n],
                             int(counts[q0:q0 + n].max())) for q0 in range(0, n_q_blocks, n))
        out.append(Group(torch.tensor(members), stride, torch.tensor(phases), int(counts[-1]),
                         chunks))
    return tuple(out)


def plan_tiles(groups: tuple[Group, ...], *, batch: int, local_blocks: int) -> int:
    """(batch, head, query block, key block) products the schedule computes, padding included."""
    return sum(batch * len(g.heads) * (c.q1 - c.q0) * (c.u + local_blocks)
               for g in groups for c in g.chunks)


class _Operands(NamedTuple):
    """A group's key-side operands, built once per call."""

    kv_heads: torch.Tensor  # [G]
    vertical_slots: torch.Tensor  # [G, U] the k / v block holding each compact vertical slot
    k_vert: torch.Tensor  # [B*G, U*bs, D]
    v_vert: torch.Tensor
    doc_vert: Optional[torch.Tensor]  # [B, G, U, bs]


def _group_operands(g: Group, call: "_Call", num_q_heads: int) -> _Operands:
    k_bhjkd, v_bhjkd, k_doc_bjk = call.k_bhjkd, call.v_bhjkd, call.k_doc_bjk
    dev, dt = k_bhjkd.device, call.qs_bhtd.dtype
    kv_heads = (g.heads // (num_q_heads // k_bhjkd.shape[1])).to(dev)
    u = torch.arange(g.n_vertical)
    vertical = call.slot((g.phase.view(-1, 1) + g.stride * u).clamp(max=call.n_global - 1)
                         .to(dev))
    d = k_bhjkd.shape[-1]
    rows = k_bhjkd.shape[0] * len(g.heads)
    k_vert = k_bhjkd[:, kv_heads.view(-1, 1), vertical].to(dt).view(rows, -1, d)
    v_vert = v_bhjkd[:, kv_heads.view(-1, 1), vertical].to(dt).view(rows, -1, d)
    doc_vert = None if k_doc_bjk is None else k_doc_bjk[:, vertical]
    return _Operands(kv_heads, vertical, k_vert, v_vert, doc_vert)


class _Scores(NamedTuple):
    vert: Optional[torch.Tensor]  # [B*G, n*bs, u*bs] (None when no row reads one)
    win: torch.Tensor  # [B*G*n, bs, L*bs]
    k_vert: Optional[torch.Tensor]  # [B*G, u*bs, D]
    v_vert: Optional[torch.Tensor]
    k_win: torch.Tensor  # [B*G*n, L*bs, D]
    v_win: torch.Tensor
    win_slots: torch.Tensor  # [n, L] k / v block of each window slot (padding: block 0's)


def _scores(g: Group, c: Chunk, ops: _Operands, call: "_Call", bs: int, local: int,
            q_block0: int, q_doc: Optional[torch.Tensor]) -> _Scores:
    """Both parts' masked scores for one chunk: the callers exponentiate them in place."""
    qs_bhtd = call.qs_bhtd
    b, _, _, d = qs_bhtd.shape
    dev, dt = qs_bhtd.device, qs_bhtd.dtype
    n, n_heads = c.q1 - c.q0, len(g.heads)
    rows = slice(c.q0 * bs, c.q1 * bs)
    neg = float("-inf")
    q = qs_bhtd[:, g.heads.to(dev), rows]  # [B, G, n*bs, D]
    i0 = q_block0 + c.q0
    # Window slot l of query block i is key block i-L+1+l; slots before block 0 (only in the
    # first L-1 query blocks) read block 0 and are masked.
    win_blocks = (i0 + torch.arange(n, device=dev)).view(-1, 1) - local + 1 + torch.arange(
        local, device=dev)
    padding = win_blocks < 0
    win_slots = call.slot(win_blocks.clamp(min=0))
    heads = ops.kv_heads.view(-1, 1, 1)
    k_win = call.k_bhjkd[:, heads, win_slots].to(dt).view(-1, local * bs, d)
    v_win = call.v_bhjkd[:, heads, win_slots].to(dt).view(-1, local * bs, d)
    win = torch.bmm(q.reshape(-1, bs, d), k_win.transpose(1, 2)).view(b, n_heads, n, bs,
                                                                       local, bs)
    # The last window slot is the diagonal block: the causal triangle.
    upper = torch.ones(bs, bs, dtype=torch.bool, device=dev).triu(1)
    win.select(4, local - 1).masked_fill_(upper, neg)
    if bool(padding.any()):
        win.masked_fill_(padding.view(1, 1, n, 1, local, 1), neg)
    vert = k_vert = v_vert = None
    if c.u:
        k_vert = ops.k_vert[:, :c.u * bs]
        v_vert = ops.v_vert[:, :c.u * bs]
        vert = torch.bmm(q.reshape(-1, n * bs, d), k_vert.transpose(1, 2))
        # Rows read a prefix of the compact blocks: only slots from the chunk's smallest count
        # on are masked anywhere (smaller phases read one more block than larger ones).
        counts = _head_counts(g, c, q_block0, local)
        first = int(counts.min())
        if first < c.u:
            past = torch.arange(first, c.u).view(1, 1, -1) >= counts.view(n_heads, n, 1)
            tail = vert.view(b, n_heads, n, bs, c.u, bs)[:, :, :, :, first:]
            tail.masked_fill_(past.to(dev).view(1, n_heads, n, 1, -1, 1), neg)
    if q_doc is not None:
        q_doc_bnq = q_doc[:, rows].reshape(b, 1, n, bs, 1, 1)
        other = q_doc_bnq != call.k_doc_bjk[:, win_slots].reshape(b, 1, n, 1, local, bs)
        win.masked_fill_(other.expand(-1, n_heads, -1, -1, -1, -1).reshape(win.shape), neg)
        if vert is not None:
            doc_v = ops.doc_vert[:, :, :c.u].reshape(b, n_heads, 1, 1, c.u * bs)
            other = q_doc[:, rows].reshape(b, 1, n, bs, 1) != doc_v
            vert.masked_fill_(other.reshape(vert.shape), neg)
    return _Scores(vert, win.view(-1, bs, local * bs), k_vert, v_vert, k_win, v_win, win_slots)


def _head_counts(g: Group, c: Chunk, q_block0: int, local: int) -> torch.Tensor:
    """[G, n] vertical blocks each head's rows read."""
    blocks = q_block0 + torch.arange(c.q0, c.q1)
    return torch.stack([_vertical_counts(blocks, local=local, stride=g.stride, phase=int(r))
                        for r in g.phase])


def _softmax_stats(s: _Scores, n_rows: int, bs: int) -> torch.Tensor:
    """Row max over both parts [B*G*n, bs, 1]."""
    m = s.win.amax(-1, keepdim=True)
    if s.vert is not None:
        m = torch.maximum(m, s.vert.view(n_rows, bs, -1).amax(-1, keepdim=True))
    return m


def _exp_(s: _Scores, sub: torch.Tensor, n_rows: int, bs: int) -> None:
    """Both score parts <- exp(score - sub) in place (sub [B*G*n, bs, 1])."""
    s.win.sub_(sub).exp_()
    if s.vert is not None:
        s.vert.view(n_rows, bs, -1).sub_(sub).exp_()


def _rows(x_bht_: torch.Tensor, heads: torch.Tensor, c: Chunk, bs: int) -> torch.Tensor:
    """The chunk's rows of a [B, H, T, ...] tensor for `heads`, as [B*G*n, bs, ...]."""
    return x_bht_[:, heads.to(x_bht_.device), c.q0 * bs:c.q1 * bs].reshape(
        -1, bs, *x_bht_.shape[3:])


def _put_rows(dst_bht_: torch.Tensor, heads: torch.Tensor, c: Chunk, bs: int,
              x: torch.Tensor) -> None:
    b, _, _, *rest = dst_bht_.shape
    dst_bht_[:, heads.to(dst_bht_.device), c.q0 * bs:c.q1 * bs] = x.reshape(
        b, len(heads), -1, *rest).to(dst_bht_.dtype)


class _Call(NamedTuple):
    qs_bhtd: torch.Tensor
    k_bhjkd: torch.Tensor
    v_bhjkd: torch.Tensor
    k_doc_bjk: Optional[torch.Tensor]
    groups: tuple[Group, ...]
    n_global: int  # global key blocks 0 .. n_global - 1 the call may name
    slots: Optional[torch.Tensor]  # [n_global] global block -> k / v block (None: identity)

    def slot(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks if self.slots is None else self.slots[blocks]


def block_slots(k_blocks: Optional[tuple[int, ...]], device: torch.device
                ) -> Optional[torch.Tensor]:
    """[last + 1] int64: global key block -> its block in k (absent blocks: 0); None for None."""
    if k_blocks is None:
        return None
    slots = torch.zeros(k_blocks[-1] + 1, dtype=torch.long, device=device)
    slots[torch.tensor(k_blocks, dtype=torch.long, device=device)] = torch.arange(
        len(k_blocks), device=device)
    return slots


def _prepare_call(q_bhtd: torch.Tensor, k_bhtd: torch.Tensor, v_bhtd: torch.Tensor,
                  pattern: S2Pattern, k_doc: Optional[torch.Tensor], *, head_offset: int,
                  q_start: int, scale: float, k_blocks: Optional[tuple[int, ...]]) -> _Call:
    """Scaled q in the compute dtype and k, v as [B, Hkv, nk, bs, D] blocks, all contiguous (the
    callers pass transposed [B, T, H, D] storage: gathering from that layout costs more than a
    copy)."""
    b, h, tq, d = q_bhtd.shape
    _, hkv, tk, _ = k_bhtd.shape
    bs = pattern.block_size
    qs_bhtd = torch.empty(q_bhtd.shape, dtype=acc_dtype(q_bhtd.dtype), device=q_bhtd.device)
    torch.mul(q_bhtd, scale, out=qs_bhtd)
    k_bhjkd = k_bhtd.contiguous().view(b, hkv, tk // bs, bs, d)
    v_bhjkd = v_bhtd.contiguous().view(b, hkv, tk // bs, bs, d)
    k_doc_bjk = None if k_doc is None else k_doc.reshape(b, tk // bs, bs)
    groups = plan(pattern, batch=b, num_q_heads=h, head_offset=head_offset,
                  q_block0=q_start // bs, n_q_blocks=tq // bs)
    n_global = tk // bs if k_blocks is None else k_blocks[-1] + 1
    return _Call(qs_bhtd, k_bhjkd, v_bhjkd, k_doc_bjk, groups, n_global,
                 block_slots(k_blocks, q_bhtd.device))


def blocked_forward(q_bhtd: torch.Tensor, k_bhtd: torch.Tensor, v_bhtd: torch.Tensor,
                    pattern: S2Pattern, *, head_offset: int, q_start: int, scale: float,
                    q_doc: Optional[torch.Tensor], k_doc: Optional[torch.Tensor],
                    k_blocks: Optional[tuple[int, ...]] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, Tq, D] input dtype, lse [B, H, Tq] float32 / float64 for float64)."""
    b, h, tq, d = q_bhtd.shape
    bs, local, q_block0 = pattern.block_size, pattern.local_blocks, q_start // pattern.block_size
    call = _prepare_call(q_bhtd, k_bhtd, v_bhtd, pattern, k_doc, head_offset=head_offset,
                         q_start=q_start, scale=scale, k_blocks=k_blocks)
    out_bhtd = torch.empty(b, h, tq, d, dtype=q_bhtd.dtype, device=q_bhtd.device)
    lse_bht = torch.empty(b, h, tq, dtype=call.qs_bhtd.dtype, device=q_bhtd.device)
    for g in call.groups:
        ops = _group_operands(g, call, h)
        for c in g.chunks:
            s = _scores(g, c, ops, call, bs, local, q_block0, q_doc)
            n_rows = s.win.shape[0]
            m = _softmax_stats(s, n_rows, bs)
            _exp_(s, m, n_rows, bs)
            z = s.win.sum(-1, keepdim=True)
            o = torch.bmm(s.win, s.v_win)
            if s.vert is not None:
                z += s.vert.view(n_rows, bs, -1).sum(-1, keepdim=True)
                o += torch.bmm(s.vert, s.v_vert).view(n_rows, bs, d)
            _put_rows(out_bhtd, g.heads, c, bs, o.div_(z))
            _put_rows(lse_bht[..., None], g.heads, c, bs, m.add_(z.log_()))
    return out_bhtd, lse_bht


def blocked_backward(dout_bhtd: torch.Tensor, q_bhtd: torch.Tensor, k_bhtd: torch.Tensor,
                     v_bhtd: torch.Tensor, out_bhtd: torch.Tensor, lse_bht: torch.Tensor,
                     pattern: S2Pattern, *, head_offset: int, q_start: int, scale: float,
                     q_doc: Optional[torch.Tensor], k_doc: Optional[torch.Tensor],
                     k_blocks: Optional[tuple[int, ...]] = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq [B, H, Tq, D], dk, dv [B, Hkv, Tk, D]) in the inputs' dtypes, from out and lse."""
    b, h, tq, d = q_bhtd.shape
    hkv, tk = k_bhtd.shape[1], k_bhtd.shape[2]
    bs, local, q_block0 = pattern.block_size, pattern.local_blocks, q_start // pattern.block_size
    nk = tk // bs
    call = _prepare_call(q_bhtd, k_bhtd, v_bhtd, pattern, k_doc, head_offset=head_offset,
                         q_start=q_start, scale=scale, k_blocks=k_blocks)
    dt, dev = call.qs_bhtd.dtype, q_bhtd.device
    do_bhtd = dout_bhtd.to(dt).contiguous()
    delta_bht1 = (do_bhtd * out_bhtd.to(dt)).sum(-1, keepdim=True)
    lse_bht1 = lse_bht.to(dt)[..., None]
    dq_bhtd = torch.empty(b, h, tq, d, dtype=dt, device=dev)
    # Key blocks flattened over (kv head, block): each group's parts fold in with index_add_.
    dk_bjkd = torch.zeros(b, hkv * nk, bs, d, dtype=dt, device=dev)
    dv_bjkd = torch.zeros_like(dk_bjkd)
    for g in call.groups:
        ops = _group_operands(g, call, h)
        n_heads = len(g.heads)
        # dk / dv of the group's compact vertical blocks [B, G, U, bs, D]
        dk_vert = torch.zeros(b, n_heads, g.n_vertical, bs, d, dtype=dt, device=dev)
        dv_vert = torch.zeros_like(dk_vert)
        for c in g.chunks:
            s = _scores(g, c, ops, call, bs, local, q_block0, q_doc)
            n_rows, n = s.win.shape[0], c.q1 - c.q0
            _exp_(s, _rows(lse_bht1, g.heads, c, bs), n_rows, bs)  # now probabilities
            do = _rows(do_bhtd, g.heads, c, bs)  # [B*G*n, bs, D]
            delta = _rows(delta_bht1, g.heads, c, bs)
            qs = _rows(call.qs_bhtd, g.heads, c, bs)
            ds_win = torch.bmm(do, s.v_win.transpose(1, 2)).sub_(delta).mul_(s.win)
            dq = torch.bmm(ds_win, s.k_win)
            # ds^T (scaled q) is scale * ds^T q: the key gradient.
            # Padding slots read block 0 with probability 0: they add zeros there.
            slot = (ops.kv_heads.view(-1, 1, 1) * nk + s.win_slots).reshape(-1)
            dk_bjkd.index_add_(1, slot, torch.bmm(ds_win.transpose(1, 2), qs).view(b, -1, bs, d))
            dv_bjkd.index_add_(1, slot, torch.bmm(s.win.transpose(1, 2), do).view(b, -1, bs, d))
            if s.vert is not None:
                do_g = do.view(b * n_heads, n * bs, d)
                ds_vert = torch.bmm(do_g, s.v_vert.transpose(1, 2)).view(n_rows, bs, -1).sub_(
                    delta).mul_(s.vert.view(n_rows, bs, -1)).view(s.vert.shape)
                dq += torch.bmm(ds_vert, s.k_vert).view(n_rows, bs, d)
                qs_g = qs.view(b * n_heads, n * bs, d)
                dk_vert[:, :, :c.u] += torch.bmm(ds_vert.transpose(1, 2), qs_g).view(
                    b, n_heads, c.u, bs, d)
                dv_vert[:, :, :c.u] += torch.bmm(s.vert.transpose(1, 2), do_g).view(
                    b, n_heads, c.u, bs, d)
            _put_rows(dq_bhtd, g.heads, c, bs, dq.mul_(scale))
        base = ops.kv_heads.view(-1, 1) * nk
        if g.n_vertical:
            # compact slots past the key range were clamped duplicates, read by no row
            keep = (g.phase.view(-1, 1) + g.stride * torch.arange(g.n_vertical)) < call.n_global
            vert_slot = (base + ops.vertical_slots)[keep.to(dev)]
            dk_bjkd.index_add_(1, vert_slot, dk_vert[:, keep.to(dev)])
            dv_bjkd.index_add_(1, vert_slot, dv_vert[:, keep.to(dev)])
    dk_bhtd = dk_bjkd.view(b, hkv, tk, d).to(k_bhtd.dtype)
    dv_bhtd = dv_bjkd.view(b, hkv, tk, d).to(v_bhtd.dtype)
    return dq_bhtd.to(q_bhtd.dtype), dk_bhtd, dv_bhtd
