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
- allgather: K/V all-gathered forward; backward, the full-length dK and dV reduce-scattered
  to their owners (a ring of point-to-point steps on gloo, NCCL's reduce-scatter on GPU). Its
  blocks skip the future as ring's do: the causal share.
- lasp2: each of the 2 chunk states `[Hq/t, d, d]` (fp32) all-gathered forward, and again
  backward. lasp1: the state chain visits the 2c zigzag chunks (ranks 0..c-1, then back):
  2 (c-1) hops between ranks, serialized, forward and again backward.
- TP (megatron, no sequence parallelism): 2 all-reduces of `[b T/c, h]` forward, 2 backward.
- DP (optim.zero 0-2): the gradients of one rank's parameters (1/t of the model, in
  `optim.grad_reduce_dtype`: fp32 by default, the parameters' dtype with `param`; ZeRO-1/2:
  the parameters' dtype) all-reduced over CP x DP, `Cluster.dp_overlap` of it hidden behind
  the backward (the loop's buckets start as they fill; the presets keep 0 until a GPU
  measures the overlap). ZeRO-1/2's reduce-scatter of the gradients and all-gather of the
  updated parameters move the same bytes as that all-reduce, so they are counted as one.
- FSDP (optim.zero=3), per micro-batch, over the N = c x dp ranks of CP x DP, units the root
  (embedding, final norm, LM head; R parameters) and each decoder layer (Lx): all-gathers
  of the parameters (a rank's 1/N of a unit, in e) in the forward, the layers' again in the
  backward but the last one's (it and the root stay gathered), and reduce-scatters of every
  unit's gradients (in `optim.grad_reduce_dtype`): (2 e P - e R - e Lx + g P) (N-1)/N bytes
  per rank, P a rank's parameters. Prefetch overlaps the next layer's gather with this
  layer's compute: exposed are the root's and the first layer's gather forward, each
  further layer's gather beyond one layer's forward compute and each gather plus
  reduce-scatter beyond one layer's backward compute (2x the forward), and the last layer's
  and the root's reduce-scatters. The recomputed forward only lengthens the backward: not
  counted as hiding anything.

Memory policy: the planner's recompute factor multiplies the compute; with memory.offload
the saved activations go to the host (`Cluster.host`) during the forward and come back
during the backward, exposed where they take longer than that compute. The chunked loss
(`train.loss_chunk` below a rank's T/c tokens) runs the LM head's forward once more, at the
GEMM efficiency.

Not modelled: the optimizer step, the LM head's and the norms' memory-bound kernels, kernel
launch gaps, the recomputed forward's communication, and contention between TP and CP traffic
on a shared link.

The clusters and their presets are in cluster.py; the layout search over this model in
search.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from longtrain.attention.plan import plan_layers
from longtrain.attention.table import get_spec
from longtrain.config.schema import AttentionConfig
from longtrain.memory.estimate import Policy, Shape, activation_bytes, recompute_cost
from longtrain.model.flops import step_flops
from longtrain.model.llama import ModelShape
from longtrain.observability.flops import causal_pairs, layer_attention_forward
from longtrain.parallel.collective_cost import (AttentionShape, Link, RingDetail, all_gather,
                                                all_reduce, reduce_scatter)
from longtrain.planning.cluster import Cluster


def _attention_cfg(backend: str, ulysses_degree: int = 0) -> Any:
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
    return layer_comm(get_spec(backend), s, c=c, link=link, fwd_attention_s=fwd_attention_s,
                      attention=_attention_cfg(backend, ulysses_degree))


def attention_op(backend: str, s: AttentionShape, *, c: int, cluster: Cluster,
                 ulysses_degree: int = 0) -> tuple[float, float, Optional[RingDetail]]:
    """(compute s, exposed comm s, ring detail) of one causal softmax attention fwd+bwd on one
    rank of a CP group of c ranks within a node (`s`: the whole sequence, one rank's heads)."""
    fwd = 4.0 * s.head_dim * s.q_heads * causal_pairs(s.seq_len) * s.batch / c
    fwd *= masked_factor(backend, s.seq_len, c)
    fwd_s = fwd / (cluster.peak_tflops * 1e12 * cluster.attn_eff)
    exposed, detail = attention_comm(backend, s, c=c, link=cluster.link(c),
                                     fwd_attention_s=fwd_s, ulysses_degree=ulysses_degree)
    return 3 * fwd_s, exposed, detail


def masked_factor(backend: str, seq_len: int, c: int) -> float:
    """The attention FLOPs a backend computes over the causal ones (its spec's
    `compute_factor`: 1 for every built-in backend, which all skip the future)."""
    return get_spec(backend).compute_factor(seq_len, c)


def linear_eff(cluster: Cluster) -> float:
    return cluster.linear_eff if cluster.linear_eff is not None else cluster.attn_eff


def linear_op(backend: str, s: AttentionShape, *, c: int, cluster: Cluster
              ) -> tuple[float, float]:
    """(compute s, exposed comm s) of one linear-attention (LASP) fwd+bwd on one rank of a CP
    group of c ranks within a node (`s`: the whole sequence, one rank's heads)."""
    fwd = layer_attention_forward("linear", t=s.seq_len, heads=s.q_heads,
                                  head_dim=s.head_dim) * s.batch / c
    compute = 3 * fwd / (cluster.peak_tflops * 1e12 * linear_eff(cluster))
    return compute, linear_comm(backend, q_heads=s.q_heads, head_dim=s.head_dim,
                                batch=s.batch, c=c, link=cluster.link(c))


def linear_comm(backend: str, *, q_heads: int, head_dim: int, batch: int, c: int, link: Link
                ) -> float:
    """Exposed CP seconds of one linear-attention layer's fwd+bwd (LASP) on one rank."""
    shape = AttentionShape(0, batch, q_heads, q_heads, head_dim, 4)
    return layer_comm(get_spec(backend), shape, c=c, link=link, fwd_attention_s=0.0,
                      attention=_attention_cfg(backend))[0]


def fsdp_comm(s: Shape, *, n: int, link: Link, fwd_layer_s: float) -> float:
    """Exposed seconds of optim.zero=3's gathers and reduce-scatters over n ranks for one
    micro-batch's forward and backward on one rank (`s`: that rank's shape; `fwd_layer_s`:
    one decoder layer's forward compute). See the module docstring."""
    if n <= 1:
        return 0.0
    e, g, lx = s.param_elem, s.grad_elem, s.largest_layer_params
    gather_root = all_gather(e * s.root_params / n, n, link)
    gather = all_gather(e * lx / n, n, link)
    scatter = reduce_scatter(g * lx, n, link)
    scatter_root = reduce_scatter(g * s.root_params, n, link)
    later = s.layers - 1
    forward = gather_root + gather + later * max(0.0, gather - fwd_layer_s)
    # the last layer stays gathered from its forward to its backward (train.fsdp)
    backward = later * max(0.0, gather + scatter - 2 * fwd_layer_s)
    return forward + backward + scatter + scatter_root


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
    # the activations offloaded to the host per device (memory.offload)
    host_gib: Optional[float] = None
    memory_policy: str = ""
    overrides: str = ""
    # optim.zero of the layout
    zero: int = 0

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
    if cfg.optim.zero:
        out += f" optim.zero={cfg.optim.zero}"
    mem = cfg.memory
    if mem.activations != "none":
        out += f" memory.activations={mem.activations}"
    if mem.checkpointing != "none":
        out += f" memory.checkpointing={mem.checkpointing}"
    if mem.offload:
        out += " memory.offload=true"
    return out


def loss_recompute_flops(cfg: Any, *, sequences: int) -> float:
    """The LM head's forward once more over `sequences` sequences: what `train.loss_chunk`
    costs (each chunk's logits are recomputed in the backward instead of kept)."""
    return 2.0 * cfg.model.hidden_size * cfg.model.vocab_size * cfg.data.seq_len * sequences


def predict(cfg: Any, cluster: Cluster, *, cost: Optional[float] = None) -> Prediction:
    """Predicted optimizer-step time of the run config on `cluster` under its memory policy
    (`memory.*`): the policy's recompute factor (`cost`, default the planner's) multiplies the
    compute, and with memory.offload the saved activations travel to the host during the
    forward and back during the backward, exposed where they take longer than that compute."""
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
    if 0 < cfg.train.loss_chunk < t_len // c:
        # the chunked loss runs each chunk's LM head again in the backward (not model FLOPs)
        matmul_s += loss_recompute_flops(cfg, sequences=b) / (tp * c) / (peak * cluster.gemm_eff)
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

    # the gradients travel in optim.grad_reduce_dtype (Shape.grad_elem)
    rank = Shape.of(cfg)
    mem = cfg.memory
    policy = Policy(mem.activations, mem.checkpointing, mem.offload and cluster.host is not None)
    if cost is None:
        cost = recompute_cost(rank, policy)
    compute = micro * (matmul_s + attention_s) * cost
    comm = {"tp": micro * tp_s, "cp": micro * cp_s}
    if cfg.optim.zero == 3:
        fwd_layer_s = (matmul_s + attention_s) / 3 / m.num_layers
        comm["fsdp"] = micro * fsdp_comm(rank, n=c * dp, link=cluster.link(world),
                                         fwd_layer_s=fwd_layer_s)
    else:
        comm["dp"] = (all_reduce(rank.params * rank.grad_elem, c * dp, cluster.link(world))
                      * (1 - cluster.dp_overlap))
    if policy.offload:
        moved = cluster.host.time(activation_bytes(rank, policy)["layers"])
        fwd = (matmul_s + attention_s) / 3
        comm["offload"] = micro * (max(0.0, moved - fwd) + max(0.0, moved - 2 * fwd))
    step = compute + sum(comm.values())
    total = step_flops(cfg)
    return Prediction(describe_layout(cfg), step, compute, comm,
                      tokens_per_s=cfg.data.batch_size * t_len / step,
                      mfu=total.total / step / (world * peak), ring_hidden=ring_hidden,
                      memory_policy=policy.name, overrides=layout_overrides(cfg),
                      zero=cfg.optim.zero)
