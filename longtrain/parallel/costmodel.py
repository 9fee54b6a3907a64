"""A step-time model for a layout on a described cluster: compute from the FLOP counts, and the
communication each parallel dimension adds, exposed or hidden behind compute.

Legend: T sequence length, b micro-batch, c the CP degree, t the TP degree, Hq / Hkv query /
key-value heads, d head dim, h hidden size, e bytes per element of the training dtype, L a
link's latency (s) and B its bandwidth (bytes/s per device, one direction).

Messages and collectives over a group of c ranks, n bytes per rank (ring algorithms):

    p2p(n)            = L + n / B
    all_reduce(n)     = 2 (c-1) (L + n / (c B))
    all_gather(n)     = (c-1) (L + n / B)            n = each rank's contribution
    reduce_scatter(n) = (c-1) (L + n / (c B))        n = the full buffer
    all_to_all(n)     = (c-1) (L + n / (c B))        n = the buffer each rank holds

A group's link is the node-internal one when its ranks fit in a node (ranks are laid out
`rank = tp_rank + tp * (cp_rank + cp * dp_rank)` and filled node by node, so a TP group spans
t consecutive ranks, a CP group t*c, the gradient group (CP x DP) the world), else the
inter-node one (its slowest hop sets a ring's pace).

Per micro-batch and layer, on one rank (FLOPs from `longtrain.observability.flops`; zigzag
balances causal work, so every rank gets 1/c of a layer's attention):

- compute = matmul FLOPs / (t c dp ... one rank's share) / (peak * gemm_eff)
            + attention FLOPs (one rank's share) / (peak * attn_eff); backward = 2x forward.
- ring: the forward rotates K/V c-1 times, each hop (2 b T/c Hkv/t d e bytes) overlapping
  one block's compute (the rank's forward attention / c): exposed max(0, p2p - block). The
  backward rotates K/V again together with the dK/dV accumulators (fp32) c-1 times against a
  backward block (2x), then returns dK/dV once more (exposed in full). Communication hides
  when a block's compute exceeds its hop: `RingDetail.hidden`.
- ulysses: all-to-alls of q, k, v, out forward and dout, dq, dk, dv backward, not overlapped.
- ulysses_ring: the all-to-alls over u ranks, then a ring over c/u ranks of blocks of
  T/(c/u) tokens x Hkv/(t u) heads.
- allgather: K/V all-gathered forward, dK/dV reduce-scattered backward.
- lasp2: each of the 2 chunk states `[Hq/t, d, d]` (fp32) all-gathered forward, and again
  backward. lasp1: the c-1 hops of the state chain, serialized, forward and backward.
- TP (megatron, no sequence parallelism): 2 all-reduces of `[b T/c, h]` forward, 2 backward.
- DP: the fp32 gradients of one rank's parameters (1/t of the model) all-reduced over
  CP x DP after the backward, `Cluster.dp_overlap` of it hidden (0 for longtrain's loop, which
  reduces after the backward).

Not modelled: the optimizer step, the LM head's and the norms' memory-bound kernels, kernel
launch gaps, recomputation (the memory policy's relative cost from the planner multiplies the
compute), and contention between TP and CP traffic on a shared link.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any, Optional

GB = 1e9


@dataclass(frozen=True)
class Link:
    """One direction of one device's share of a link."""

    gbytes_per_s: float
    latency_s: float

    def time(self, nbytes: float) -> float:
        return self.latency_s + nbytes / (self.gbytes_per_s * GB)


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: int
    devices_per_node: int
    # dense peak of one device in the training dtype
    peak_tflops: float
    # achieved fraction of the peak for GEMMs and for attention kernels (fwd+bwd)
    gemm_eff: float
    attn_eff: float
    intra: Link
    inter: Link
    memory_gib: float
    # fraction of the gradient all-reduce hidden behind the backward
    dp_overlap: float = 0.0

    @property
    def devices(self) -> int:
        return self.nodes * self.devices_per_node

    def link(self, span: int) -> Link:
        """The link a group of `span` consecutive ranks communicates over."""
        return self.intra if span <= self.devices_per_node else self.inter


# H100 SXM: 989 dense bf16 TFLOP/s; NVLink 4 = 450 GB/s per direction per GPU; one 400 Gb/s
# (50 GB/s) InfiniBand NIC per GPU; achieved fractions typical of large GEMMs (~60%) and of
# flash-attention fwd+bwd (~45%) on H100; 80 GiB HBM.
PRESETS = {
    "h100-8x8-ib400": Cluster("h100-8x8-ib400", nodes=8, devices_per_node=8, peak_tflops=989.0,
                              gemm_eff=0.6, attn_eff=0.45, intra=Link(450.0, 3e-6),
                              inter=Link(50.0, 10e-6), memory_gib=80.0),
    "h100-1x8": Cluster("h100-1x8", nodes=1, devices_per_node=8, peak_tflops=989.0,
                        gemm_eff=0.6, attn_eff=0.45, intra=Link(450.0, 3e-6),
                        inter=Link(50.0, 10e-6), memory_gib=80.0),
}


def cluster_from_config(cfg: Any) -> Optional[Cluster]:
    """The `cluster` config group as a Cluster (None: preset none); overrides replace the
    preset's fields."""
    cc = cfg.cluster
    if cc.preset == "none":
        return None
    base = PRESETS[cc.preset]
    changes: dict[str, Any] = {}
    for name in ("nodes", "devices_per_node", "peak_tflops", "memory_gib"):
        if getattr(cc, name) is not None:
            changes[name] = getattr(cc, name)
    if cc.inter_node_gbit is not None:
        changes["inter"] = replace(base.inter, gbytes_per_s=cc.inter_node_gbit / 8)
    if cc.intra_node_gbytes is not None:
        changes["intra"] = replace(base.intra, gbytes_per_s=cc.intra_node_gbytes)
    return replace(base, **changes) if changes else base


# ----------------------------------------------------------------- collectives


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (xs, ys)."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        raise ValueError(f"a line needs 2 distinct x values, got {sorted(set(xs))}")
    mx, my = sum(xs) / n, sum(ys) / n
    slope = (sum((x - mx) * (y - my) for x, y in zip(xs, ys))
             / sum((x - mx) ** 2 for x in xs))
    return my - slope * mx, slope


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


# ----------------------------------------------------------------- attention under CP


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
    dK/dV accumulators travelling in the backward."""
    if c <= 1:
        return 0.0, RingDetail(0.0, fwd_attention_s)
    block = fwd_attention_s / c
    hop = p2p(kv_bytes, link)
    fwd = (c - 1) * max(0.0, hop - block)
    bwd_hop = p2p(kv_bytes + acc_bytes, link)
    bwd = (c - 1) * max(0.0, bwd_hop - 2 * block) + p2p(acc_bytes, link)
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


def attention_comm(backend: str, s: AttentionShape, *, c: int, link: Link,
                   fwd_attention_s: float, ulysses_degree: int = 0
                   ) -> tuple[float, Optional[RingDetail]]:
    """Exposed CP seconds of one softmax attention layer's fwd+bwd on one rank."""
    local = s.batch * s.seq_len / c * s.head_dim * s.elt
    q_bytes, kv_bytes = local * s.q_heads, local * s.kv_heads
    acc = 2 * kv_bytes * 4 / s.elt
    if c <= 1 or backend == "dense":
        return 0.0, None
    if backend in ("ring", "s2"):
        return ring_exposed(2 * kv_bytes, fwd_attention_s, c, link, acc)
    if backend == "ulysses":
        # fwd q, k, v, out; bwd dout, dq, dk, dv
        return 2 * (all_to_all(2 * q_bytes, c, link) + all_to_all(2 * kv_bytes, c, link)), None
    if backend == "ulysses_ring":
        u = ulysses_degree or 2
        r = c // u
        a2a = 2 * (all_to_all(2 * q_bytes, u, link) + all_to_all(2 * kv_bytes, u, link))
        # after the all-to-all a rank holds u shards' tokens (T/r) for 1/u of the heads
        exposed, detail = ring_exposed(2 * kv_bytes, fwd_attention_s, r, link, acc)
        return a2a + exposed, detail
    if backend == "allgather":
        return all_gather(2 * kv_bytes, c, link) + reduce_scatter(c * acc, c, link), None
    raise ValueError(f"no communication model for attention backend {backend!r}")


def attention_op(backend: str, s: AttentionShape, *, c: int, cluster: Cluster,
                 ulysses_degree: int = 0) -> tuple[float, float, Optional[RingDetail]]:
    """(compute s, exposed comm s, ring detail) of one causal softmax attention fwd+bwd on one
    rank of a CP group of c ranks within a node (`s`: the whole sequence, one rank's heads)."""
    from longtrain.observability.flops import causal_pairs

    fwd = 4.0 * s.head_dim * s.q_heads * causal_pairs(s.seq_len) * s.batch / c
    fwd_s = fwd / (cluster.peak_tflops * 1e12 * cluster.attn_eff)
    exposed, detail = attention_comm(backend, s, c=c, link=cluster.link(c),
                                     fwd_attention_s=fwd_s, ulysses_degree=ulysses_degree)
    return 3 * fwd_s, exposed, detail


def linear_comm(backend: str, *, q_heads: int, head_dim: int, batch: int, c: int, link: Link
                ) -> float:
    """Exposed CP seconds of one linear-attention layer's fwd+bwd (LASP) on one rank."""
    state = batch * q_heads * head_dim * head_dim * 4
    if c <= 1:
        return 0.0
    if backend == "lasp1":
        return 2 * (c - 1) * p2p(state, link)
    # lasp2: the 2 zigzag chunks' states all-gathered, forward and backward
    return 2 * all_gather(2 * state, c, link)


# ----------------------------------------------------------------- a step


@dataclass
class Prediction:
    layout: str
    step_s: float
    compute_s: float
    # exposed communication seconds by group
    comm_s: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    # whether ring K/V hops hide behind block compute (None: no ring)
    ring_hidden: Optional[bool] = None
    memory_gib: Optional[float] = None
    memory_policy: str = ""
    overrides: str = ""

    @property
    def exposed_s(self) -> float:
        return sum(self.comm_s.values())


def describe_layout(cfg: Any) -> str:
    p = cfg.parallel
    dp = p.world_size // (p.tp * p.cp)
    return f"tp {p.tp} x cp {p.cp} x dp {dp}, {cfg.attention.backend}"


def layout_overrides(cfg: Any) -> str:
    return (f"parallel.tp={cfg.parallel.tp} parallel.cp={cfg.parallel.cp} "
            f"attention={cfg.attention.backend}")


def predict(cfg: Any, cluster: Cluster, *, cost: float = 1.0) -> Prediction:
    """Predicted optimizer-step time of the run config on `cluster` (`cost`: the memory
    policy's recompute factor on compute)."""
    from longtrain.memory.planner import Shape
    from longtrain.model.llama import ModelShape
    from longtrain.observability.flops import (layer_attention_forward, layer_attention_kinds,
                                               step_flops)

    m, p = cfg.model, cfg.parallel
    tp, c, world = p.tp, p.cp, p.world_size
    dp = world // (tp * c)
    b = cfg.data.micro_batch_size
    micro = cfg.data.batch_size // (dp * b)
    if micro < 1 or cfg.data.batch_size % (dp * b):
        raise ValueError(f"data.batch_size={cfg.data.batch_size} is not a multiple of dp * "
                         f"data.micro_batch_size = {dp} * {b}")
    t_len = cfg.data.seq_len
    elt = 2 if cfg.train.precision == "bf16" else 4
    d = ModelShape(m, 1).head_dim
    peak = cluster.peak_tflops * 1e12

    # one micro-batch on one rank
    mb = step_flops(cfg, sequences=b)
    matmul_s = mb.matmul / (tp * c) / (peak * cluster.gemm_eff)
    attention_s = mb.attention / (tp * c) / (peak * cluster.attn_eff)
    cp_link, tp_link = cluster.link(tp * c), cluster.link(tp)
    shape = AttentionShape(t_len, b, m.num_heads // tp, max(1, m.num_kv_heads // tp), d, elt)
    pattern = None
    cp_s, ring_hidden = 0.0, None
    backend = cfg.attention.backend
    for kind in layer_attention_kinds(cfg):
        if kind == "linear":
            cp_s += linear_comm(backend if backend in ("lasp1", "lasp2") else "lasp2",
                                q_heads=shape.q_heads, head_dim=d, batch=b, c=c, link=cp_link)
            continue
        if kind == "s2" and pattern is None:
            from longtrain.attention.s2 import s2_pattern

            pattern = s2_pattern(cfg.attention.s2, m.num_heads)
        fwd = layer_attention_forward(kind, t=t_len, heads=m.num_heads, head_dim=d,
                                      pattern=pattern) * b / (tp * c)
        fwd_s = fwd / (peak * cluster.attn_eff)
        softmax_backend = (cfg.attention.softmax if backend in ("lasp1", "lasp2")
                           else "ring" if backend == "s2" and kind == "softmax" else backend)
        exposed, detail = attention_comm(softmax_backend, shape, c=c, link=cp_link,
                                         fwd_attention_s=fwd_s,
                                         ulysses_degree=cfg.attention.ulysses_degree)
        cp_s += exposed
        if detail is not None:
            ring_hidden = detail.hidden if ring_hidden is None else ring_hidden and detail.hidden
    act = b * t_len / c * m.hidden_size * elt
    tp_s = m.num_layers * 4 * all_reduce(act, tp, tp_link)

    params = Shape.of(cfg).params
    dp_s = all_reduce(params * 4, c * dp, cluster.link(world)) * (1 - cluster.dp_overlap)

    compute = micro * (matmul_s + attention_s) * cost
    comm = {"tp": micro * tp_s, "cp": micro * cp_s, "dp": dp_s}
    step = compute + sum(comm.values())
    total = step_flops(cfg)
    return Prediction(describe_layout(cfg), step, compute, comm,
                      tokens_per_s=cfg.data.batch_size * t_len / step,
                      mfu=total.total / step / (world * peak), ring_hidden=ring_hidden,
                      overrides=layout_overrides(cfg))


# ----------------------------------------------------------------- layouts


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_configs(cfg: Any, cluster: Cluster) -> list[Any]:
    """The run config with every (tp, cp, attention backend) for the same world size: tp
    within a node, backends that fit the model (lasp2 for linear models)."""
    from longtrain.attention.linear import LINEAR_BACKENDS

    world = cfg.parallel.world_size
    linear = cfg.attention.backend in LINEAR_BACKENDS
    out = []
    for tp in _divisors(world):
        if tp > cluster.devices_per_node:
            continue
        for c in _divisors(world // tp):
            if linear:
                backends = [cfg.attention.backend]
            elif c == 1:
                backends = ["dense"]
            else:
                backends = ["ring", "ulysses", "ulysses_ring", "allgather"]
            for backend in backends:
                cand = copy.deepcopy(cfg)
                cand.parallel.tp, cand.parallel.cp = tp, c
                cand.attention.backend = backend
                if backend != "ulysses_ring":
                    cand.attention.ulysses_degree = 0
                out.append(cand)
    return out


def recommend(cfg: Any, cluster: Cluster, *, top: int = 3) -> list[Prediction]:
    """Valid layouts for the run's world size whose memory fits a device (the cheapest
    memory policy that fits), fastest first."""
    from longtrain.config.validate import problems
    from longtrain.memory.planner import GIB, estimates

    budget = (cfg.memory.budget_gib or cluster.memory_gib) * GIB
    ranked = []
    for cand in candidate_configs(cfg, cluster):
        if problems(cand):
            continue
        fits = [e for e in estimates(cand, on_gpu=True) if e.total <= budget]
        if not fits:
            continue
        best = min(fits, key=lambda e: (e.cost, e.policy.offload, e.total))
        pred = predict(cand, cluster, cost=best.cost)
        pred.memory_gib, pred.memory_policy = best.total / GIB, best.policy.name
        ranked.append(pred)
    ranked.sort(key=lambda p: p.step_s)
    return ranked[:top]


def format_prediction(p: Prediction) -> str:
    comm = ", ".join(f"{k} {v:.3f}" for k, v in p.comm_s.items())
    ring = ("" if p.ring_hidden is None else
            "; ring K/V hops hide behind block compute" if p.ring_hidden
            else "; ring K/V hops exceed block compute (exposed)")
    return (f"{p.step_s:.3f} s/step = compute {p.compute_s:.3f} + exposed comm ({comm}) s; "
            f"{p.tokens_per_s:,.0f} tokens/s, MFU {p.mfu:.1%}{ring}")


def report_lines(cfg: Any) -> list[str]:
    """The --check lines: this layout's predicted step on the cluster and the best layouts."""
    cluster = cluster_from_config(cfg)
    if cluster is None:
        return []
    lines = [f"predicted on {cluster.name} ({cluster.nodes} x {cluster.devices_per_node} "
             f"devices, {cluster.peak_tflops:g} TFLOP/s peak, intra {cluster.intra.gbytes_per_s:g}"
             f" GB/s, inter {cluster.inter.gbytes_per_s:g} GB/s per device; "
             f"longtrain.parallel.costmodel):",
             f"  this layout ({describe_layout(cfg)}): {format_prediction(predict(cfg, cluster))}"]
    best = recommend(cfg, cluster)
    if not best:
        lines.append("  no layout of this world size fits the device memory")
        return lines
    lines.append("  recommended layouts (valid, fit memory, fastest first):")
    for i, p in enumerate(best, 1):
        lines.append(f"    {i}. {p.overrides} (memory {p.memory_policy}, "
                     f"{p.memory_gib:.1f} GiB): {format_prediction(p)}")
    return lines


def cluster_problems(cfg: Any) -> list[str]:
    """What is wrong with the `cluster` group, naming fields and values."""
    cc = cfg.cluster
    found = []
    if cc.preset != "none" and cc.preset not in PRESETS:
        return [f"cluster.preset={cc.preset!r} is not a known cluster; choose from "
                f"{['none', *PRESETS]}"]
    for name in ("nodes", "devices_per_node", "peak_tflops", "memory_gib", "inter_node_gbit",
                 "intra_node_gbytes"):
        v = getattr(cc, name)
        if v is not None and not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            found.append(f"cluster.{name}={v!r} must be a positive number")
    if cc.preset == "none":
        set_ = [n for n in ("nodes", "devices_per_node", "peak_tflops", "memory_gib",
                            "inter_node_gbit", "intra_node_gbytes") if getattr(cc, n) is not None]
        if set_:
            found.append(f"cluster.{set_[0]} is set but cluster.preset=none: name a preset "
                         f"({list(PRESETS)}) to override")
    elif not found:
        cl = cluster_from_config(cfg)
        if cl.devices != cfg.parallel.world_size:
            found.append(f"cluster.nodes * cluster.devices_per_node = {cl.nodes} * "
                         f"{cl.devices_per_node} = {cl.devices} != parallel.world_size="
                         f"{cfg.parallel.world_size}")
    return found
