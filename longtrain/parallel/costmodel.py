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

- compute = the rank's matmul FLOPs (1/(t c) of a micro-batch's) / (peak * gemm_eff)
            + its attention FLOPs / (peak * attn_eff) (linear layers: linear_eff);
            backward = 2x forward.
- ring: the forward rotates K/V c-1 times, each hop (2 b T/c Hkv/t d e bytes) overlapping
  one block's compute (the rank's forward attention / c): exposed max(0, p2p - block). The
  backward rotates K/V c-1 times against a backward block (2x the forward's): exposed
  max(0, p2p - 2 block) each; the dK/dV accumulators (fp32) travel c times, each exposed in
  full: ring.py waits for the previous holder's dK/dV before computing the next block, so no
  compute hides them. Communication hides when a block's compute exceeds its K/V hop:
  `RingDetail.hidden`.
- ulysses: all-to-alls of q, k, v, out forward and dout, dq, dk, dv backward, not overlapped.
- ulysses_ring: the all-to-alls over u ranks, then a ring over c/u ranks of blocks of
  T/(c/u) tokens x Hkv/(t u) heads.
- allgather: K/V all-gathered forward; backward, the full-length dK and dV all-reduced (as
  linear.py does: gloo has no reduce-scatter). Its mask is applied, not skipped: a rank
  computes its T/c queries against all T keys, 2x the causal share.
- lasp2: each of the 2 chunk states `[Hq/t, d, d]` (fp32) all-gathered forward, and again
  backward. lasp1: the state chain visits the 2c zigzag chunks (ranks 0..c-1, then back):
  2 (c-1) hops between ranks, serialized, forward and again backward.
- TP (megatron, no sequence parallelism): 2 all-reduces of `[b T/c, h]` forward, 2 backward.
- DP: the gradients of one rank's parameters (1/t of the model, in the parameters' dtype:
  bf16 under train.precision=bf16, fp32 master weights live in the optimizer only)
  all-reduced over CP x DP after the backward, `Cluster.dp_overlap` of it hidden (0 for
  longtrain's loop, which reduces after the backward).

Memory policy: the planner's recompute factor multiplies the compute; with memory.offload
the saved activations go to the host (`Cluster.host`) during the forward and come back
during the backward, exposed where they take longer than that compute.

Not modelled: the optimizer step, the LM head's and the norms' memory-bound kernels, kernel
launch gaps, the recomputed forward's communication, and contention between TP and CP traffic
on a shared link.

Presets: `h100-8x8-ib400` / `h100-1x8` (assumptions at PRESETS) and `cpu-local`, this
machine as fitted by benchmarks/costmodel.py (CPU_FIT).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any, Optional

# the formulas live in collective_cost; re-exported for the benchmarks that import them here
from longtrain.parallel.collective_cost import (GB, AttentionShape, Link, RingDetail, all_gather,
                                               all_reduce, all_to_all, p2p, reduce_scatter,
                                               ring_exposed)

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
    # achieved fraction of the peak for linear (lightning) attention; None: attn_eff
    linear_eff: Optional[float] = None
    # a device's link to host memory (memory.offload's traffic); None: no offloading
    host: Optional[Link] = None

    @property
    def devices(self) -> int:
        return self.nodes * self.devices_per_node

    def link(self, span: int) -> Link:
        """The link a group of `span` consecutive ranks communicates over."""
        return self.intra if span <= self.devices_per_node else self.inter


# H100 SXM: 989 dense bf16 TFLOP/s; NVLink 4 = 450 GB/s per direction per GPU; one 400 Gb/s
# (50 GB/s) InfiniBand NIC per GPU; achieved fractions typical of large GEMMs (~60%) and of
# flash-attention fwd+bwd (~45%) on H100, lightning attention assumed at 30%; 80 GiB HBM;
# PCIe Gen5 x16 to the host, 64 GB/s nominal, ~50 GB/s reached with pinned memory. These are
# specification bandwidths (NCCL reaches ~80% of them on large messages): communication
# here is a lower bound.
_H100 = dict(peak_tflops=989.0, gemm_eff=0.6, attn_eff=0.45, linear_eff=0.3,
             intra=Link(450.0, 3e-6), inter=Link(50.0, 10e-6), memory_gib=80.0,
             host=Link(50.0, 10e-6))
PRESETS = {
    "h100-8x8-ib400": Cluster("h100-8x8-ib400", nodes=8, devices_per_node=8, **_H100),
    "h100-1x8": Cluster("h100-1x8", nodes=1, devices_per_node=8, **_H100),
}

# This machine (AMD EPYC, 2 cores, 23 GiB RAM) as a cluster of 2 gloo processes x 1 thread,
# every value fitted by `python -m benchmarks.costmodel` (full run, 2026-11-23, its "Fit"
# table): the peak is one thread's fp32 GEMM rate (so gemm_eff = 1), attn_eff / linear_eff
# the measured fwd+bwd rates of causal SDPA / lightning attention over it, the link the
# weighted least-squares fit of a gloo ring hop over loopback (one node: the inter-node link
# is the same), memory half the RAM. Refit with the benchmark on another machine.
CPU_FIT = {"peak_tflops": 0.102, "attn_eff": 0.71, "linear_eff": 0.28, "gbytes_per_s": 2.07,
           "latency_s": 2.7e-4, "memory_gib": 11.5}
_CPU_LINK = Link(CPU_FIT["gbytes_per_s"], CPU_FIT["latency_s"])
PRESETS["cpu-local"] = Cluster("cpu-local", nodes=1, devices_per_node=2,
                               peak_tflops=CPU_FIT["peak_tflops"], gemm_eff=1.0,
                               attn_eff=CPU_FIT["attn_eff"], intra=_CPU_LINK, inter=_CPU_LINK,
                               memory_gib=CPU_FIT["memory_gib"],
                               linear_eff=CPU_FIT["linear_eff"])


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


def fit_line(xs: list[float], ys: list[float], *, weights: Optional[list[float]] = None
             ) -> tuple[float, float]:
    """(intercept, slope) of the (weighted) least-squares line through (xs, ys). Timings over
    sizes spanning decades: weights 1 / y^2 fit relative errors, so the small messages set
    the latency instead of being drowned by the large ones."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        raise ValueError(f"a line needs 2 distinct x values, got {sorted(set(xs))}")
    w = weights or [1.0] * n
    sw = sum(w)
    mx = sum(wi * x for wi, x in zip(w, xs)) / sw
    my = sum(wi * y for wi, y in zip(w, ys)) / sw
    slope = (sum(wi * (x - mx) * (y - my) for wi, x, y in zip(w, xs, ys))
             / sum(wi * (x - mx) ** 2 for wi, x in zip(w, xs)))
    return my - slope * mx, slope


# ----------------------------------------------------------------- attention under CP


def _attention_cfg(backend: str, ulysses_degree: int = 0) -> Any:
    from longtrain.config.schema import AttentionConfig

    return AttentionConfig(backend=backend, ulysses_degree=ulysses_degree)


def layer_comm(spec: Any, s: AttentionShape, *, c: int, link: Link, fwd_attention_s: float,
               attention: Any) -> tuple[float, Optional[RingDetail]]:
    """Exposed CP seconds of one attention layer's fwd+bwd on one rank, by the backend spec's
    communication model."""
    if spec.comm is None:
        if c <= 1:
            return 0.0, None
        raise ValueError(f"no communication model for attention backend {spec.name!r}")
    return spec.comm(s, c=c, link=link, fwd_attention_s=fwd_attention_s, attention=attention)


def attention_comm(backend: str, s: AttentionShape, *, c: int, link: Link,
                   fwd_attention_s: float, ulysses_degree: int = 0
                   ) -> tuple[float, Optional[RingDetail]]:
    """Exposed CP seconds of one softmax attention layer's fwd+bwd on one rank."""
    from longtrain.attention.table import get_spec

    return layer_comm(get_spec(backend), s, c=c, link=link, fwd_attention_s=fwd_attention_s,
                      attention=_attention_cfg(backend, ulysses_degree))


def attention_op(backend: str, s: AttentionShape, *, c: int, cluster: Cluster,
                 ulysses_degree: int = 0) -> tuple[float, float, Optional[RingDetail]]:
    """(compute s, exposed comm s, ring detail) of one causal softmax attention fwd+bwd on one
    rank of a CP group of c ranks within a node (`s`: the whole sequence, one rank's heads)."""
    from longtrain.observability.flops import causal_pairs

    fwd = 4.0 * s.head_dim * s.q_heads * causal_pairs(s.seq_len) * s.batch / c
    fwd *= masked_factor(backend, s.seq_len, c)
    fwd_s = fwd / (cluster.peak_tflops * 1e12 * cluster.attn_eff)
    exposed, detail = attention_comm(backend, s, c=c, link=cluster.link(c),
                                     fwd_attention_s=fwd_s, ulysses_degree=ulysses_degree)
    return 3 * fwd_s, exposed, detail


def masked_factor(backend: str, seq_len: int, c: int) -> float:
    """The attention FLOPs a backend computes over the causal ones (its spec's
    `compute_factor`; allgather applies its mask instead of skipping the future)."""
    from longtrain.attention.table import get_spec

    return get_spec(backend).compute_factor(seq_len, c)


def linear_eff(cluster: Cluster) -> float:
    return cluster.linear_eff if cluster.linear_eff is not None else cluster.attn_eff


def linear_op(backend: str, s: AttentionShape, *, c: int, cluster: Cluster
              ) -> tuple[float, float]:
    """(compute s, exposed comm s) of one linear-attention (LASP) fwd+bwd on one rank of a CP
    group of c ranks within a node (`s`: the whole sequence, one rank's heads)."""
    from longtrain.observability.flops import layer_attention_forward

    fwd = layer_attention_forward("linear", t=s.seq_len, heads=s.q_heads,
                                  head_dim=s.head_dim) * s.batch / c
    compute = 3 * fwd / (cluster.peak_tflops * 1e12 * linear_eff(cluster))
    return compute, linear_comm(backend, q_heads=s.q_heads, head_dim=s.head_dim,
                                batch=s.batch, c=c, link=cluster.link(c))


def linear_comm(backend: str, *, q_heads: int, head_dim: int, batch: int, c: int, link: Link
                ) -> float:
    """Exposed CP seconds of one linear-attention layer's fwd+bwd (LASP) on one rank."""
    from longtrain.attention.table import get_spec

    shape = AttentionShape(0, batch, q_heads, q_heads, head_dim, 4)
    return layer_comm(get_spec(backend), shape, c=c, link=link, fwd_attention_s=0.0,
                      attention=_attention_cfg(backend))[0]


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
    """The overrides selecting this layout (and its memory policy, unless none)."""
    out = (f"parallel.tp={cfg.parallel.tp} parallel.cp={cfg.parallel.cp} "
           f"attention={cfg.attention.backend}")
    mem = cfg.memory
    if mem.activations != "none":
        out += f" memory.activations={mem.activations}"
    if mem.checkpointing != "none":
        out += f" memory.checkpointing={mem.checkpointing}"
    if mem.offload:
        out += " memory.offload=true"
    return out


def predict(cfg: Any, cluster: Cluster, *, cost: Optional[float] = None) -> Prediction:
    """Predicted optimizer-step time of the run config on `cluster` under its memory policy
    (`memory.*`): the policy's recompute factor (`cost`, default the planner's) multiplies the
    compute, and with memory.offload the saved activations travel to the host during the
    forward and back during the backward, exposed where they take longer than that compute."""
    from longtrain.memory.planner import Policy, Shape, activation_bytes, recompute_cost
    from longtrain.model.llama import ModelShape
    from longtrain.attention.plan import plan_layers
    from longtrain.model.flops import step_flops

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
    # fwd+bwd attention compute, summed over the layers below
    attention_s = 0.0
    cp_link, tp_link = cluster.link(tp * c), cluster.link(tp)
    shape = AttentionShape(t_len, b, m.num_heads // tp, max(1, m.num_kv_heads // tp), d, elt)
    cp_s, ring_hidden = 0.0, None
    for layer in plan_layers(cfg.attention, m):
        spec = layer.spec
        fwd = spec.forward_flops(t=t_len, heads=m.num_heads, head_dim=d,
                                 attention=cfg.attention) * b / (tp * c)
        eff = linear_eff(cluster) if layer.kind == "linear" else cluster.attn_eff
        fwd_s = fwd * spec.compute_factor(t_len, c) / (peak * eff)
        attention_s += 3 * fwd_s
        exposed, detail = layer_comm(spec, shape, c=c, link=cp_link, fwd_attention_s=fwd_s,
                                     attention=cfg.attention)
        cp_s += exposed
        if detail is not None:
            ring_hidden = detail.hidden if ring_hidden is None else ring_hidden and detail.hidden
    act = b * t_len / c * m.hidden_size * elt
    tp_s = m.num_layers * 4 * all_reduce(act, tp, tp_link)

    # the gradients are in the parameters' dtype (Shape.param_elem)
    grads = Shape.of(cfg)
    dp_s = all_reduce(grads.params * grads.param_elem, c * dp, cluster.link(world)) * (1 - cluster.dp_overlap)

    mem = cfg.memory
    policy = Policy(mem.activations, mem.checkpointing, mem.offload and cluster.host is not None)
    if cost is None:
        cost = recompute_cost(Shape.of(cfg), policy)
    compute = micro * (matmul_s + attention_s) * cost
    comm = {"tp": micro * tp_s, "cp": micro * cp_s, "dp": dp_s}
    if policy.offload:
        moved = cluster.host.time(activation_bytes(Shape.of(cfg), policy)["layers"])
        fwd = (matmul_s + attention_s) / 3
        comm["offload"] = micro * (max(0.0, moved - fwd) + max(0.0, moved - 2 * fwd))
    step = compute + sum(comm.values())
    total = step_flops(cfg)
    return Prediction(describe_layout(cfg), step, compute, comm,
                      tokens_per_s=cfg.data.batch_size * t_len / step,
                      mfu=total.total / step / (world * peak), ring_hidden=ring_hidden,
                      memory_policy=policy.name, overrides=layout_overrides(cfg))


# ----------------------------------------------------------------- layouts


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_configs(cfg: Any, cluster: Cluster) -> list[Any]:
    """The run config with every (tp, cp, attention backend) for the same world size: tp
    within a node, backends that fit the model (lasp2 for linear models)."""
    from longtrain.attention.plan import is_linear_backend

    world = cfg.parallel.world_size
    linear = is_linear_backend(cfg.attention.backend)
    out = []
    for tp in _divisors(world):
        if tp > cluster.devices_per_node:
            continue
        for c in _divisors(world // tp):
            if linear:
                backends = sorted({cfg.attention.backend, "lasp2"})
            elif cfg.attention.backend == "s2":
                # another backend would change the (sparse) model, not only its layout
                backends = ["s2"]
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


def with_policy(cfg: Any, policy: Any) -> Any:
    """`cfg` running the memory policy `policy` (a planner Policy)."""
    out = copy.deepcopy(cfg)
    out.memory.activations, out.memory.checkpointing = policy.activations, policy.checkpointing
    out.memory.offload, out.memory.auto = policy.offload, False
    return out


def fastest_fitting(cfg: Any, cluster: Cluster) -> Optional[Prediction]:
    """The layout of `cfg` under each memory policy whose estimate fits a device (offloading
    only with a host link), predicted; the fastest, or None when none fits."""
    from longtrain.memory.planner import GIB, estimates

    budget = (cfg.memory.budget_gib or cluster.memory_gib) * GIB
    best = None
    for e in estimates(cfg, on_gpu=cluster.host is not None):
        if e.total > budget:
            continue
        pred = predict(with_policy(cfg, e.policy), cluster, cost=e.cost)
        pred.memory_gib = e.total / GIB
        if best is None or pred.step_s < best.step_s:
            best = pred
    return best


def recommend(cfg: Any, cluster: Cluster, *, top: int = 3) -> list[Prediction]:
    """Valid layouts for the run's world size whose memory fits a device (under the memory
    policy that makes each fastest: recomputation and offload traffic are part of the
    prediction), fastest first."""
    from longtrain.config.validate import problems

    ranked = []
    for cand in candidate_configs(cfg, cluster):
        if problems(cand):
            continue
        pred = fastest_fitting(cand, cluster)
        if pred is not None:
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
