"""Causal linear attention (lightning attention with a per-head decay) and its sequence
parallelism: LASP-1, LASP-2, and LASP-2H's all-gather attention for the softmax layers of
hybrid models.

Legend: B batch, T local sequence length, H heads (GQA already expanded), K key/query dim,
V value dim, n the number of sequence chunks over the CP group (2 * cp: the zigzag layout
gives rank r chunks r and 2cp-1-r; 1 at cp=1).

For one head with decay lambda the layer computes o_t = sum_{s<=t, same document}
lambda^(t-s) (q_t . k_s) v_s. A chunk c of length L contributes the state
M_c = sum over its last document's tokens of lambda^(L-1-s) k_s^T v_s, and the state entering
chunk c is S_0 = 0, S_{c+1} = carry_c lambda^L S_c + M_c, where carry_c says the whole chunk
continues the document of the incoming state (else that state ends inside it). A chunk's
output is its intra-chunk attention (the lightning kernel, no communication) plus
lambda^(i+1) q_i S_c for the rows still in the incoming state's document.

How S reaches each chunk is the SP method, and neither moves anything that grows with T:
- lasp1: point to point along the chunk chain (the chain visits ranks 0..cp-1, cp-1..0);
  backward passes dS back along the chain.
- lasp2: an AllGather of every chunk's M (issued asynchronously as each local chunk's
  attention finishes, so the first travels while the second computes), a local prefix scan;
  backward is one AllGather of dS and a suffix scan.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from longtrain.attention.allgather import all_gather_chunks, local_chunk_ids, order_gathered
from longtrain.attention.types import (AttentionContext, AttentionMeta, BackendSpec,
                                       LinearAttentionFn)
from longtrain.config.pattern import layer_kinds, pattern_problems
from longtrain.observability.flops import layer_attention_forward
from longtrain.parallel.collective_cost import AttentionShape, Link, all_gather, p2p
from longtrain.parallel.watch import collective
from longtrain_kernels.lightning_attn import lightning_attention

DECAYS = ("slopes", "slopes_by_layer", "none")


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's head slopes (Press et al. 2022), which Lightning Attention / TransNormerLLM use
    as decay rates: for a power of two H, 2^(-8 i / H), i = 1..H; otherwise those of the
    largest power of two P below H, then every other slope of 2P (its odd ones) up to H."""
    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    if num_heads & (num_heads - 1) == 0:
        return power_of_two(num_heads)
    p = 1 << (num_heads.bit_length() - 1)
    return power_of_two(p) + power_of_two(2 * p)[0::2][:num_heads - p]


def head_log_decay(num_heads: int, kind: str, *, layer: int = 0, num_layers: int = 1
                   ) -> torch.Tensor:
    """[num_heads] float32 log(lambda) per *global* head of decoder layer `layer`:
    "slopes" = -alibi_slopes(H) (Lightning Attention's rates), "slopes_by_layer" = the same
    scaled by 1 - layer / (num_layers - 1) + 1e-5 (TransNormerLLM's per-layer rates: the first
    layer decays fastest, the last almost not at all), "none" = 0 (plain causal linear
    attention)."""
    if kind not in DECAYS:
        raise ValueError(f"model.linear_decay={kind!r} is not one of {list(DECAYS)}")
    if kind == "none":
        return torch.zeros(num_heads)
    slopes = torch.tensor(alibi_slopes(num_heads), dtype=torch.float64)
    if kind == "slopes_by_layer":
        slopes = slopes * (1.0 - layer / max(num_layers - 1, 1) + 1e-5)
    return (-slopes).float()


def _lightning(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
               doc_bt: Optional[torch.Tensor], kernels: str) -> tuple[torch.Tensor, torch.Tensor]:
    return lightning_attention(q, k, v, log_decay, doc_bt, backend=kernels)


# --------------------------------------------------------------------------- chunk bookkeeping

def _split(x: torch.Tensor, ctx: AttentionContext) -> list[torch.Tensor]:
    return [x] if ctx.cp_size == 1 else list(x.chunk(2, dim=1))


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _PendingGather:
    """LASP-2's AllGather of the chunk states, issued asynchronously chunk by chunk: the first
    chunk's state travels while the second chunk's attention computes."""

    def __init__(self, ctx: AttentionContext) -> None:
        self.ctx = ctx
        self.parts: list[list[torch.Tensor]] = []
        self.works: list[Any] = []

    def add(self, state: torch.Tensor) -> None:
        parts = [torch.empty_like(state) for _ in range(self.ctx.cp_size)]
        self.works.append(dist.all_gather(parts, state.contiguous(), group=self.ctx.cp_group,
                                          async_op=True))
        self.parts.append(parts)

    def wait(self) -> torch.Tensor:
        with collective("LASP-2 state all-gather", group="context-parallel"):
            for work in self.works:
                work.wait()
        per_rank = [torch.cat([chunk[r] for chunk in self.parts])
                    for r in range(self.ctx.cp_size)]
        return order_gathered(per_rank, self.ctx.cp_size)


def _doc_summary(doc_bt: Optional[torch.Tensor], ctx: AttentionContext, n: int, b: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """carry [n, B] (chunk c passes its incoming state on: it lies wholly in that state's
    document) and entry [n, B] (the incoming state's document id; -1 for chunk 0)."""
    if doc_bt is None:
        carry = torch.ones(n, b, dtype=torch.bool, device=device)
        entry = torch.zeros(n, b, dtype=torch.long, device=device)
        entry[0] = -1
        return carry, entry
    local = torch.stack([torch.stack([c[:, 0], c[:, -1]]) for c in _split(doc_bt, ctx)])
    ends = local if ctx.cp_size == 1 else all_gather_chunks(local, ctx,
                                                             what="LASP document-bounds all-gather")
    first, last = ends[:, 0], ends[:, 1]
    entry = torch.full_like(last, -1)
    entry[1:] = last[:-1]
    carry = (first == last) & (first == entry)
    return carry, entry


def _scan(m_all: torch.Tensor, carry: torch.Tensor, decay_l: torch.Tensor) -> torch.Tensor:
    """S_c for every chunk from every chunk's M: S_0 = 0, S_{c+1} = carry_c lambda^L S_c + M_c.
    m_all [n, B, H, K, V], carry [n, B], decay_l [H] (lambda^L)."""
    s = [torch.zeros_like(m_all[0])]
    for c in range(m_all.shape[0] - 1):
        s.append(_decayed(s[-1], carry[c], decay_l) + m_all[c])
    return torch.stack(s)


def _reverse_scan(ds_all: torch.Tensor, carry: torch.Tensor, decay_l: torch.Tensor
                  ) -> torch.Tensor:
    """dM_c from every chunk's dS_c (the adjoint of `_scan`): G_c = dS_c + carry_c lambda^L
    G_{c+1}, dM_c = G_{c+1}; the last chunk's M feeds nothing."""
    n = ds_all.shape[0]
    dm = [torch.zeros_like(ds_all[0])]
    g = ds_all[n - 1]
    for c in range(n - 2, -1, -1):
        dm.append(g)
        g = ds_all[c] + _decayed(g, carry[c], decay_l)
    return torch.stack(dm[::-1])


def _decayed(s_bhkv: torch.Tensor, carry_b: torch.Tensor, decay_l_h: torch.Tensor
             ) -> torch.Tensor:
    return s_bhkv * (carry_b.to(s_bhkv.dtype)[:, None, None, None]
                     * decay_l_h.to(s_bhkv.dtype)[None, :, None, None])


# --------------------------------------------------------------------------- the state exchange

class _Lasp2States(torch.autograd.Function):
    """Local chunks' M [2, B, H, K, V] -> their incoming states S, by one AllGather."""

    @staticmethod
    def forward(fctx: Any, m_local: torch.Tensor, pending: _PendingGather, carry: torch.Tensor,
                decay_l: torch.Tensor, ids: list[int], ctx: AttentionContext) -> torch.Tensor:
        s_all = _scan(pending.wait(), carry, decay_l)
        fctx.save_for_backward(carry, decay_l)
        fctx.ids, fctx.attn_ctx = ids, ctx
        return s_all[ids]

    @staticmethod
    def backward(fctx: Any, ds_local: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        carry, decay_l = fctx.saved_tensors
        ds_all = all_gather_chunks(ds_local, fctx.attn_ctx, what="LASP-2 dS all-gather")
        return _reverse_scan(ds_all, carry, decay_l)[fctx.ids], None, None, None, None, None


def _chain_owner(c: int, cp: int) -> int:
    return c if c < cp else 2 * cp - 1 - c


class _Lasp1States(torch.autograd.Function):
    """Local chunks' M -> their incoming states S, passed point to point along the chain of
    chunks 0, 1, ..., 2cp-1 (ranks 0..cp-1 then back); backward runs the chain in reverse."""

    @staticmethod
    def forward(fctx: Any, m_local: torch.Tensor, carry: torch.Tensor, decay_l: torch.Tensor,
                ids: list[int], ctx: AttentionContext) -> torch.Tensor:
        fctx.save_for_backward(carry, decay_l)
        fctx.ids, fctx.attn_ctx = ids, ctx
        mine = {c: m_local[i] for i, c in enumerate(ids)}
        states = _walk_chain(ctx, order=range(2 * ctx.cp_size),
                             step=lambda c, s: _decayed(s, carry[c], decay_l) + mine[c],
                             start=torch.zeros_like(m_local[0]), what="LASP-1 state send/recv")
        return torch.stack([states[c] for c in ids])

    @staticmethod
    def backward(fctx: Any, ds_local: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        carry, decay_l = fctx.saved_tensors
        ids, ctx = fctx.ids, fctx.attn_ctx
        ds = {c: ds_local[i] for i, c in enumerate(ids)}
        # g(c) = dL/dS_c through every later chunk: g(c) = dS_c + carry_c lambda^L g(c + 1);
        # what enters chunk c on the reverse walk is g(c + 1) = dM_c (0 for the last chunk)
        dm = _walk_chain(ctx, order=range(2 * ctx.cp_size - 1, -1, -1),
                         step=lambda c, g_next: ds[c] + _decayed(g_next, carry[c], decay_l),
                         start=torch.zeros_like(ds_local[0]), what="LASP-1 dS send/recv")
        return torch.stack([dm[c] for c in ids]), None, None, None, None


def _walk_chain(ctx: AttentionContext, *, order: range,
                step: Callable[[int, torch.Tensor], torch.Tensor], start: torch.Tensor,
                what: str) -> dict[int, torch.Tensor]:
    """Walk the chunk chain in `order`, each rank acting for the chunks it owns: the value
    entering chunk `c` is `start` for the first, else received from the previous chunk's owner
    (or kept, when that is this rank); `step(c, entering)` goes on to the next chunk's owner.
    Returns {c: the value entering c} for this rank's chunks."""
    cp, rank = ctx.cp_size, ctx.cp_rank
    ranks = dist.get_process_group_ranks(ctx.cp_group)
    seq = list(order)
    out: dict[int, torch.Tensor] = {}
    carried: Optional[torch.Tensor] = None
    sends = []
    with collective(what, group="context-parallel"):
        for pos, c in enumerate(seq):
            if _chain_owner(c, cp) != rank:
                continue
            prev = seq[pos - 1] if pos > 0 else None
            if prev is None:
                entering = start
            elif _chain_owner(prev, cp) == rank:
                entering = carried
            else:
                entering = torch.empty_like(start)
                dist.recv(entering, src=ranks[_chain_owner(prev, cp)], group=ctx.cp_group)
            leaving = step(c, entering)
            out[c] = entering
            carried = leaving
            nxt = seq[pos + 1] if pos + 1 < len(seq) else None
            if nxt is not None and _chain_owner(nxt, cp) != rank:
                sends.append(dist.isend(leaving.contiguous(), dst=ranks[_chain_owner(nxt, cp)],
                                        group=ctx.cp_group))
        for req in sends:
            req.wait()
    return out


# --------------------------------------------------------------------------- the layer op

def _inter(q: torch.Tensor, s_bhkv: torch.Tensor, log_decay: torch.Tensor,
           doc_bt: Optional[torch.Tensor], entry_b: torch.Tensor) -> torch.Tensor:
    """lambda^(i+1) q_i S for the rows still in the incoming state's document."""
    dt = s_bhkv.dtype
    i = torch.arange(1, q.shape[1] + 1, device=q.device, dtype=dt)
    w_blh = torch.exp(i[:, None] * log_decay.to(dt)[None, :]).expand(q.shape[0], -1, -1)
    if doc_bt is not None:
        w_blh = w_blh * (doc_bt == entry_b[:, None]).to(dt)[:, :, None]
    return torch.einsum("blhk,bhkv->blhv", q.to(dt) * w_blh[..., None], s_bhkv).to(q.dtype)


def _lasp(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
          log_decay: torch.Tensor, meta: AttentionMeta, ctx: AttentionContext) -> torch.Tensor:
    doc = meta.doc_ids_bt
    if ctx.cp_size == 1:
        return _lightning(q, k, v, log_decay, doc, ctx.kernels)[0]
    ids = local_chunk_ids(ctx)
    carry, entry = _doc_summary(doc, ctx, 2 * ctx.cp_size, q.shape[0], q.device)
    qs, ks, vs = _split(q, ctx), _split(k, ctx), _split(v, ctx)
    docs = _split(doc, ctx) if doc is not None else [None, None]
    dt = _state_dtype(q)
    decay_l = torch.exp(log_decay.to(dt) * qs[0].shape[1])
    pending = _PendingGather(ctx) if method == "lasp2" else None
    intra, states = [], []
    for qc, kc, vc, dc in zip(qs, ks, vs, docs):
        o, m = _lightning(qc, kc, vc, log_decay, dc, ctx.kernels)
        intra.append(o)
        states.append(m.to(dt))
        if pending is not None:
            # this chunk's state travels while the next chunk's attention computes
            pending.add(states[-1].detach()[None])
    m_local = torch.stack(states)
    if pending is not None:
        s_local = _Lasp2States.apply(m_local, pending, carry, decay_l, ids, ctx)
    else:
        s_local = _Lasp1States.apply(m_local, carry, decay_l, ids, ctx)
    outs = [o if c == 0 else o + _inter(qc, s_local[i], log_decay, dc, entry[c])
            for i, (c, o, qc, dc) in enumerate(zip(ids, intra, qs, docs))]
    return torch.cat(outs, dim=1)


def lasp1_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                    meta: AttentionMeta, ctx: AttentionContext) -> torch.Tensor:
    """Causal linear attention of this rank's zigzag shard, the state passed along the chain
    of chunks (LASP-1). q, k [B, T, H, K], v [B, T, H, V], log_decay [H] (this rank's heads)."""
    return _lasp("lasp1", q, k, v, log_decay, meta, ctx)


def lasp2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                    meta: AttentionMeta, ctx: AttentionContext) -> torch.Tensor:
    """As `lasp1_attention`, the states exchanged by one AllGather (LASP-2)."""
    return _lasp("lasp2", q, k, v, log_decay, meta, ctx)


_LINEAR: dict[str, LinearAttentionFn] = {"lasp1": lasp1_attention, "lasp2": lasp2_attention}


def linear_attention(name: str) -> LinearAttentionFn:
    if name not in _LINEAR:
        raise ValueError(f"attention.backend={name!r} is not a linear-attention method "
                         f"({list(_LINEAR)})")
    return _LINEAR[name]


# --------------------------------------------------------------------------- the specs

def linear_forward_flops(*, t: int, heads: int, head_dim: int, attention: Any) -> float:
    return layer_attention_forward("linear", t=t, heads=heads, head_dim=head_dim)


def _state_bytes(s: AttentionShape) -> float:
    return s.batch * s.q_heads * s.head_dim * s.head_dim * 4


def lasp1_comm(s: AttentionShape, *, c: int, link: Link, fwd_attention_s: float = 0.0,
               attention: Any = None) -> tuple[float, None]:
    """2 (c-1) chained hops of a chunk state forward, the same backward."""
    if c <= 1:
        return 0.0, None
    return 4 * (c - 1) * p2p(_state_bytes(s), link), None


def lasp2_comm(s: AttentionShape, *, c: int, link: Link, fwd_attention_s: float = 0.0,
               attention: Any = None) -> tuple[float, None]:
    """The 2 zigzag chunks' states all-gathered, forward and backward."""
    if c <= 1:
        return 0.0, None
    return 2 * all_gather(2 * _state_bytes(s), c, link), None


SOFTMAX_FOR_LINEAR = ("allgather", "ring", "dense")


def softmax_layer_problems(cfg: Any) -> list[str]:
    """attention=lasp1|lasp2: the backend `attention.softmax` names for a hybrid's softmax
    layers."""
    m, a = cfg.model, cfg.attention
    if pattern_problems(m.layer_pattern) or "softmax" not in layer_kinds(m, linear_default=True):
        return []
    if a.softmax not in SOFTMAX_FOR_LINEAR:
        return [f"attention.softmax={a.softmax!r} (the softmax layers of "
                f"model.layer_pattern={m.layer_pattern!r}) is not one of "
                f"{list(SOFTMAX_FOR_LINEAR)}"]
    if a.softmax == "dense" and cfg.parallel.cp > 1:
        return [f"attention.softmax='dense' cannot run with parallel.cp={cfg.parallel.cp}; "
                f"use allgather (LASP-2H) or ring"]
    return []


LASP1 = BackendSpec(name="lasp1", kind="linear", shards_sequence=True,
                    build=lambda attention, model: lasp1_attention,
                    forward_flops=linear_forward_flops, comm=lasp1_comm,
                    problems=softmax_layer_problems)
LASP2 = BackendSpec(name="lasp2", kind="linear", shards_sequence=True,
                    build=lambda attention, model: lasp2_attention,
                    forward_flops=linear_forward_flops, comm=lasp2_comm,
                    problems=softmax_layer_problems)

