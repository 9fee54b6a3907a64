"""Cost formulas of collectives and messages, and one rank's share of an attention layer.

Legend: L a link's latency (s), B its bandwidth (bytes/s per device, one direction), c the
group size, n bytes (ring algorithms):

    p2p(n)            = L + n / B
    all_reduce(n)     = 2 (c-1) (L + n / (c B))
    all_gather(n)     = (c-1) (L + n / B)            n = each rank's contribution
    reduce_scatter(n) = (c-1) (L + n / (c B))        n = the full buffer
    all_to_all(n)     = (c-1) (L + n / (c B))        n = the buffer each rank holds

The attention backends' communication models (`BackendSpec.comm`) are written with these;
`longtrain.planning.costmodel` composes them into a step.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Link:
    """One direction of one device's share of a link."""

    gbytes_per_s: float
    latency_s: float

    def time(self, nbytes: float) -> float:
        return self.latency_s + nbytes / (self.gbytes_per_s * GB)


def p2p(n: float, link: Link) -> float:
    return link.time(n)


def all_reduce(n: float, c: int, link: Link) -> float:
    return 0.0 if c <= 1 else 2 * (c - 1) * link.time(n / c)


def all_gather(n: float, c: int, link: Link) -> float:
    return 0.0 if c <= 1 else (c - 1) * link.time(n)


def reduce_scatter(n: float, c: int, link: Link) -> float:
    return 0.0 if c <= 1 else (c - 1) * link.time(n / c)


def all_to_all(n: float, c: int, link: Link) -> float:
    return 0.0 if c <= 1 else (c - 1) * link.time(n / c)


@dataclass(frozen=True)
class RingDetail:
    hop_s: float
    block_s: float

    @property
    def hidden(self) -> bool:
        return self.block_s >= self.hop_s


def ring_exposed(kv_bytes: float, fwd_attention_s: float, c: int, link: Link,
                 acc_bytes: float) -> tuple[float, RingDetail]:
    """Exposed seconds of one ring attention fwd+bwd over c ranks: `kv_bytes` the K/V block a
    rank holds, `fwd_attention_s` the rank's whole forward attention compute, `acc_bytes` the
    dK/dV accumulators travelling in the backward (c hops, each waited for before the next
    block's compute: exposed whole)."""
    if c <= 1:
        return 0.0, RingDetail(0.0, fwd_attention_s)
    block = fwd_attention_s / c
    hop = p2p(kv_bytes, link)
    fwd = (c - 1) * max(0.0, hop - block)
    bwd = (c - 1) * max(0.0, hop - 2 * block) + c * p2p(acc_bytes, link)
    return fwd + bwd, RingDetail(hop, block)


@dataclass(frozen=True)
class AttentionShape:
    """One rank's part of one attention layer: tokens per sequence T, sequences b, the
    rank's heads (after TP), head dim, bytes per element."""

    seq_len: int
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    elt: int
