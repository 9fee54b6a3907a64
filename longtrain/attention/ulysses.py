"""Ulysses attention (all-to-all over heads) and its 2-D form with a ring (USP / LoongTrain).

Legend: B batch, T this rank's local length (two zigzag chunks), Hq query / Hkv key-value
heads on this rank (after TP), D head dim, u the ulysses degree (all-to-all group size),
R the ring degree (cp = u * R).

`ulysses`: DeepSpeed's `DistributedAttention` exchanges q/k/v over the CP group so that each
rank holds the whole sequence for Hq/u query and Hkv/u key-value heads (GQA: K/V travel with
their own heads, not expanded to the query heads; where Hkv < u or u does not divide it, each
K/V head is repeated just enough that every rank receives the one its query heads read:
`kv_replication`). The gathered sequence is the concatenation of the ranks'
zigzag shards, so the local attention permutes it to natural order, runs dense attention with
the causal / document mask, permutes back, and the reverse all-to-all returns heads to their
owners.

`ulysses_ring`: the all-to-all runs over a ulysses group (u consecutive CP ranks). With the
global zigzag over all cp ranks, the union of a ulysses group's shards is exactly ring rank
g's zigzag shard of the sequence cut into 2R super-chunks (cp=4, u=2: ranks 0,1 hold chunks
{0,7},{1,6} -> {0,1 | 6,7}). So after the all-to-all the tokens are reordered into that
layout and ring attention runs over the ring group (the ranks at the same position in every
ulysses group); then the reorder and the all-to-all are undone.

Document ids are all-gathered over the ulysses group and reordered the same way.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from longtrain.attention.dense import dense_attention, softmax_forward_flops
from longtrain.attention.ring import kv_bytes, ring_attention_fn
from longtrain.attention.types import AttentionContext, AttentionMeta, BackendSpec
from longtrain.parallel.collective_cost import (AttentionShape, Link, RingDetail, all_to_all,
                                                ring_exposed)
from longtrain.parallel.deepspeed_comm import ensure_deepspeed_comm
from longtrain.parallel.layout import split_for_cp
from longtrain.parallel.watch import collective

if TYPE_CHECKING:
    from longtrain.config.schema import RunConfig

# DistributedAttention on [B, T, H, D]: scatter heads (dim 2), gather the sequence (dim 1)
_SCATTER_HEADS, _GATHER_SEQ, _BATCH_DIM = 2, 1, 0


def resolve_ulysses_degree(backend: str, degree: int, cp: int) -> int:
    """The all-to-all group size `attention.ulysses_degree` stands for (0 -> the default)."""
    if degree != 0:
        return degree
    return cp if backend == "ulysses" else 2


def hierarchical_cp_sizes(backend: str, degree: int, cp: int) -> Optional[tuple[int, int]]:
    """`init_parallel(cp_sizes=...)` for this backend: (ulysses, ring) or None (no 2-D groups)."""
    if backend != "ulysses_ring":
        return None
    u = resolve_ulysses_degree(backend, degree, cp)
    return u, cp // u


def _head_problems(*, num_heads: int, tp: int, degree: int, degree_from: str) -> list[str]:
    """The all-to-all gives each rank an equal share of the query heads, so they must divide;
    key/value heads need not (`kv_replication`)."""
    local = num_heads // tp
    if local % degree != 0:
        return [f"model.num_heads={num_heads} / parallel.tp={tp} = {local} local query heads "
                f"is not divisible by the ulysses degree {degree} ({degree_from}): the "
                f"all-to-all gives each rank an equal share of the query heads"]
    return []


def kv_replication(kv_heads: int, degree: int) -> int:
    """How many times each local key/value head is repeated before the all-to-all: 1 when the
    degree divides them, else lcm(kv_heads, degree) / kv_heads, so that every rank receives
    the key/value heads of the query heads it receives (a 70B model at TP=8 has one K/V head
    per rank: Ulysses over 4 ranks sends 4 copies, one to each). Their gradients sum back
    through the repeat."""
    return math.lcm(kv_heads, degree) // kv_heads


def ulysses_problems(cfg: RunConfig) -> list[str]:
    """Pre-flight checks of `attention=ulysses|ulysses_ring` (empty for other backends).

    Covers attention.ulysses_degree vs parallel.cp, and the degree vs the local query heads
    (model.num_heads / parallel.tp); key/value heads are replicated where they fall short.
    """
    backend = cfg.attention.backend
    if backend not in ("ulysses", "ulysses_ring"):
        return []
    cp, tp, degree = cfg.parallel.cp, cfg.parallel.tp, cfg.attention.ulysses_degree
    if cp < 1 or tp < 1:
        # ParallelDims reports these
        return []
    if backend == "ulysses":
        if degree not in (0, cp):
            return [f"attention.ulysses_degree={degree} must be 0 or parallel.cp={cp} for "
                    f"attention.backend='ulysses' (use attention=ulysses_ring for a 2-D split)"]
        degree_from = f"attention.ulysses_degree={degree} -> parallel.cp={cp}"
    else:
        u = resolve_ulysses_degree(backend, degree, cp)
        if u < 1 or cp % u != 0 or u >= cp:
            return [f"attention.ulysses_degree={degree} (0 means 2) must divide parallel.cp={cp} "
                    f"and be smaller than it for attention.backend='ulysses_ring' (the ring "
                    f"spans parallel.cp / attention.ulysses_degree ranks)"]
        degree_from = f"attention.ulysses_degree={degree}"
    m = cfg.model
    if min(m.num_heads, m.num_kv_heads) < 1 or m.num_heads % tp or m.num_kv_heads % tp:
        # the model checks report heads vs tp
        return []
    return _head_problems(num_heads=m.num_heads, tp=tp,
                          degree=resolve_ulysses_degree(backend, degree, cp),
                          degree_from=degree_from)


def _tp_size() -> int:
    """TP degree when megatron's groups exist (for error messages), else 1."""
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        return ps.get_tensor_model_parallel_world_size()
    return 1


def _check_heads(hq: int, degree: int, *, backend: str) -> None:
    tp = _tp_size()
    found = _head_problems(num_heads=hq * tp, tp=tp, degree=degree,
                           degree_from=f"attention.backend={backend!r}")
    if found:
        raise ValueError("; ".join(found))


def sequence_positions_after_all_to_all(t_local: int, *, cp_size: int, ulysses: int,
                                        ring_rank: int) -> torch.Tensor:
    """[u * T] global positions of the tokens a ulysses group's all-to-all gathers, in order.

    The all-to-all concatenates the shards of CP ranks u*g .. u*g+u-1 (g = ring_rank).
    """
    positions = torch.arange(t_local * cp_size)
    return torch.cat([split_for_cp(positions, cp_size=cp_size, cp_rank=ulysses * ring_rank + i,
                                   dim=0) for i in range(ulysses)])


@functools.lru_cache(maxsize=64)
def _reorder_cpu(t_local: int, cp_size: int, ulysses: int, ring_rank: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    have = sequence_positions_after_all_to_all(t_local, cp_size=cp_size, ulysses=ulysses,
                                               ring_rank=ring_rank)
    # ring rank g's zigzag over R = cp / u super-chunks (R == 1: the natural order)
    want = split_for_cp(torch.arange(t_local * cp_size), cp_size=cp_size // ulysses,
                        cp_rank=ring_rank, dim=0)
    slot = torch.full((t_local * cp_size,), -1, dtype=torch.long)
    slot[have] = torch.arange(have.numel())
    to_ring = slot[want]
    assert want.numel() == have.numel() and bool((to_ring >= 0).all()), \
        "a ulysses group's zigzag shards are not ring rank's super-chunk shard"
    return to_ring, torch.argsort(to_ring)


def ulysses_reorder(t_local: int, *, cp_size: int, ulysses: int, ring_rank: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(to_ring, to_gathered) index vectors along the sequence, each [u * T].

    `gathered[:, to_ring]` is ring rank `ring_rank`'s zigzag shard over cp/u super-chunks (the
    natural order when u == cp); `ring[:, to_gathered]` undoes it.
    """
    to_ring, to_gathered = _reorder_cpu(t_local, cp_size, ulysses, ring_rank)
    return to_ring.to(device), to_gathered.to(device)


class _LocalAttention:
    """What runs between the all-to-alls: reorder, attend over the sequence, reorder back."""

    def __init__(self, *, to_ring: torch.Tensor, to_gathered: torch.Tensor, ring_group,
                 causal: bool, scale: Optional[float], doc_bt: Optional[torch.Tensor],
                 kernels: str) -> None:
        self.to_ring, self.to_gathered = to_ring, to_gathered
        self.ring_group, self.kernels = ring_group, kernels
        self.causal, self.scale, self.doc_bt = causal, scale, doc_bt

    def __call__(self, q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor
                 ) -> torch.Tensor:
        q, k, v = (x.index_select(1, self.to_ring) for x in (q_bthd, k_bthd, v_bthd))
        if self.ring_group is None:
            meta = AttentionMeta(causal=self.causal, doc_ids_bt=self.doc_bt,
                                 softmax_scale=self.scale)
            out = dense_attention(q, k, v, meta, AttentionContext())
        else:
            out = ring_attention_fn(q, k, v, group=self.ring_group, causal=self.causal,
                                    scale=self.scale, doc_bt=self.doc_bt, kernels=self.kernels)
        return out.index_select(1, self.to_gathered)


def _gather_docs(doc_bt: torch.Tensor, group, to_ring: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(doc_bt) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, doc_bt.contiguous(), group=group)
    return torch.cat(parts, dim=1).index_select(1, to_ring)


def ulysses_attention_fn(q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor, *,
                         ulysses_group, ring_group, cp_size: int, cp_rank: int,
                         causal: bool = True, scale: Optional[float] = None,
                         doc_bt: Optional[torch.Tensor] = None,
                         backend: str = "ulysses", kernels: str = "auto") -> torch.Tensor:
    """Ulysses (ring_group None: u == cp) or ulysses x ring attention on this rank's zigzag shard.

    q [B, T, Hq, D], k/v [B, T, Hkv, D] with Hq divisible by u = size of `ulysses_group` (Hkv
    is replicated to a multiple of u where it is not: `kv_replication`); doc_bt [B, T] int64 document ids of the local tokens (None: one
    document). Returns [B, T, Hq, D] in q's dtype.
    """
    u = dist.get_world_size(ulysses_group)
    ring = 1 if ring_group is None else dist.get_world_size(ring_group)
    assert u * ring == cp_size, f"ulysses {u} x ring {ring} != cp {cp_size}"
    # the all-to-all gathers in group-rank order; the layout is in CP-rank order
    assert dist.get_rank(ulysses_group) == cp_rank % u
    ring_rank = cp_rank // u
    assert ring_group is None or dist.get_rank(ring_group) == ring_rank
    _check_heads(q_bthd.shape[2], u, backend=backend)
    r = kv_replication(k_bthd.shape[2], u)
    if r > 1:
        k_bthd, v_bthd = (x.repeat_interleave(r, dim=2) for x in (k_bthd, v_bthd))
    to_ring, to_gathered = ulysses_reorder(q_bthd.shape[1], cp_size=cp_size, ulysses=u,
                                           ring_rank=ring_rank, device=q_bthd.device)
    doc = None if doc_bt is None else _gather_docs(doc_bt, ulysses_group, to_ring)
    local = _LocalAttention(to_ring=to_ring, to_gathered=to_gathered, ring_group=ring_group,
                            causal=causal, scale=scale, doc_bt=doc, kernels=kernels)
    ensure_deepspeed_comm()
    from deepspeed.sequence.layer import DistributedAttention

    attn = DistributedAttention(local, ulysses_group, scatter_idx=_SCATTER_HEADS,
                                gather_idx=_GATHER_SEQ)

    # forward all-to-alls; in backward the layer's own record names the module
    with collective("Ulysses all-to-all (DeepSpeed DistributedAttention)", group="ulysses"):
        return attn(q_bthd, k_bthd, v_bthd, _BATCH_DIM)


def ulysses_attention(q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor,
                      meta: AttentionMeta, ctx: AttentionContext) -> torch.Tensor:
    """`attention=ulysses`: all-to-all over the whole CP group (shapes as in attention.types)."""
    if ctx.layout != "zigzag":
        raise ValueError(f"ulysses attention needs the zigzag layout, got {ctx.layout!r}")
    if ctx.cp_size == 1:
        return dense_attention(q_bthd, k_bthd, v_bthd, meta, ctx)
    return ulysses_attention_fn(q_bthd, k_bthd, v_bthd, ulysses_group=ctx.cp_group,
                                ring_group=None, cp_size=ctx.cp_size, cp_rank=ctx.cp_rank,
                                causal=meta.causal, scale=meta.softmax_scale,
                                doc_bt=meta.doc_ids_bt, backend="ulysses")


def ulysses_ring_attention(q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor,
                           meta: AttentionMeta, ctx: AttentionContext) -> torch.Tensor:
    """`attention=ulysses_ring`: all-to-all over ctx.ulysses_group, ring over ctx.ring_group."""
    if ctx.layout != "zigzag":
        raise ValueError(f"ulysses_ring attention needs the zigzag layout, got {ctx.layout!r}")
    if ctx.ulysses_group is None or ctx.ring_group is None:
        raise ValueError("attention.backend='ulysses_ring' needs the 2-D CP groups: start the "
                         "runtime with init_parallel(..., cp_sizes=(ulysses, ring)) and pass "
                         "ulysses_group / ring_group in the AttentionContext")
    return ulysses_attention_fn(q_bthd, k_bthd, v_bthd, ulysses_group=ctx.ulysses_group,
                                ring_group=ctx.ring_group, cp_size=ctx.cp_size,
                                cp_rank=ctx.cp_rank, causal=meta.causal,
                                scale=meta.softmax_scale, doc_bt=meta.doc_ids_bt,
                                backend="ulysses_ring", kernels=ctx.kernels)


def ulysses_comm(s: AttentionShape, *, c: int, link: Link, fwd_attention_s: float,
                 attention: Any) -> tuple[float, Optional[RingDetail]]:
    """All-to-alls of q, k, v, out forward and dout, dq, dk, dv backward, not overlapped."""
    if c <= 1:
        return 0.0, None
    q, kv = kv_bytes(s, c)
    kv *= kv_replication(s.kv_heads, c)
    return 2 * (all_to_all(2 * q, c, link) + all_to_all(kv, c, link)), None


def ulysses_ring_comm(s: AttentionShape, *, c: int, link: Link, fwd_attention_s: float,
                      attention: Any) -> tuple[float, Optional[RingDetail]]:
    """The all-to-alls over u ranks, then a ring over c/u ranks."""
    if c <= 1:
        return 0.0, None
    u = attention.ulysses_degree or 2
    q, kv = kv_bytes(s, c)
    kv *= kv_replication(s.kv_heads, u)
    a2a = 2 * (all_to_all(2 * q, u, link) + all_to_all(kv, u, link))
    # after the all-to-all a rank holds u shards' tokens (T/r) for 1/u of the heads
    exposed, detail = ring_exposed(kv, fwd_attention_s, c // u, link, kv * 4 / s.elt)
    return a2a + exposed, detail


ULYSSES = BackendSpec(name="ulysses", kind="softmax", shards_sequence=True,
                      build=lambda attention, model: ulysses_attention,
                      forward_flops=softmax_forward_flops, comm=ulysses_comm,
                      problems=ulysses_problems)
ULYSSES_RING = BackendSpec(
    name="ulysses_ring", kind="softmax", shards_sequence=True,
    build=lambda attention, model: ulysses_ring_attention,
    forward_flops=softmax_forward_flops, comm=ulysses_ring_comm, problems=ulysses_problems,
    cp_sizes=lambda attention, cp: hierarchical_cp_sizes("ulysses_ring",
                                                         attention.ulysses_degree, cp))
