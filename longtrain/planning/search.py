"""Layout search: every (tp, cp, backend) of the run's world size under the memory policy that
makes it fastest while it fits, ranked by the cost model; and the --check lines that show it.

A layout whose model state does not fit at the configured `optim.zero` under any memory
policy is tried once more fully sharded over CP x DP (`optim.zero=3`): sharding is the knob
of last resort, since it adds gathers to every micro-batch."""

from __future__ import annotations

import copy
from typing import Any, Optional

from longtrain.attention.table import TABLE, get_spec
from longtrain.memory.estimate import GIB, estimates
from longtrain.planning.cluster import Cluster, cluster_from_config
from longtrain.planning.costmodel import Prediction, describe_layout, layout_overrides, predict
from longtrain.planning.validate import problems


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def search_backends(spec: Any, c: int) -> list[str]:
    """The backends a layout search may give a model configured with `spec` at CP degree c:
    the same model (the same layer kind; a spec with its own layer pattern, like s2's sparse
    one, is kept, since another would change the model), with a communication model, and
    sharding the sequence when c > 1 (c = 1: the unsharded ones, where the kind has one)."""
    if spec.layer_specs is not None:
        return [spec.name]
    same = [s for s in TABLE.values()
            if s.kind == spec.kind and s.layer_specs is None and s.comm is not None]
    unsharded = sorted(s.name for s in same if not s.shards_sequence)
    if c == 1 and unsharded:
        return unsharded
    return sorted(s.name for s in same if s.shards_sequence)


def candidate_configs(cfg: Any, cluster: Cluster) -> list[Any]:
    """The run config with every (tp, cp, attention backend) for the same world size: tp
    within a node, the backends `search_backends` allows."""
    spec = get_spec(cfg.attention.backend)
    out = []
    for tp in _divisors(cfg.parallel.world_size):
        if tp > cluster.devices_per_node:
            continue
        for c in _divisors(cfg.parallel.world_size // tp):
            for backend in search_backends(spec, c):
                cand = copy.deepcopy(cfg)
                cand.parallel.tp, cand.parallel.cp = tp, c
                cand.attention.backend = backend
                if get_spec(backend).cp_sizes(cand.attention, c) is None:
                    cand.attention.ulysses_degree = 0
                out.append(cand)
    return out


def with_policy(cfg: Any, policy: Any) -> Any:
    """`cfg` running the memory policy `policy` (a planner Policy)."""
    out = copy.deepcopy(cfg)
    out.memory.activations, out.memory.checkpointing = policy.activations, policy.checkpointing
    out.memory.offload, out.memory.auto = policy.offload, False
    return out


def fits_host(e: Any, cluster: Cluster) -> bool:
    """Whether an estimate's offloaded bytes fit the cluster's host memory per device."""
    return cluster.host_memory_gib is None or e.host <= cluster.host_memory_gib * GIB


def fastest_fitting(cfg: Any, cluster: Cluster) -> Optional[Prediction]:
    """The layout of `cfg` under each memory policy whose estimate fits a device (offloading
    only with a host link, and only what fits the host's memory), predicted; the fastest, or
    None when none fits."""
    budget = (cfg.memory.budget_gib or cluster.memory_gib) * GIB
    best = None
    for e in estimates(cfg, on_gpu=cluster.host is not None):
        if e.total > budget or not fits_host(e, cluster):
            continue
        pred = predict(with_policy(cfg, e.policy), cluster, cost=e.cost)
        pred.memory_gib, pred.host_gib = e.total / GIB, e.host / GIB
        if best is None or pred.step_s < best.step_s:
            best = pred
    return best


def fully_sharded(cfg: Any) -> Optional[Any]:
    """`cfg` with its model state sharded over CP x DP (optim.zero=3); None where that is
    nothing new (already zero 3, or a CP x DP group of one rank) or not a valid run."""
    p = cfg.parallel
    if cfg.optim.zero == 3 or p.world_size // p.tp == 1:
        return None
    out = copy.deepcopy(cfg)
    out.optim.zero = 3
    return None if problems(out) else out


def layout_prediction(cand: Any, cluster: Cluster) -> Optional[Prediction]:
    """`fastest_fitting` for a valid layout at its configured optim.zero, or, where no memory
    policy fits that way, fully sharded; None where neither fits."""
    pred = fastest_fitting(cand, cluster)
    if pred is None:
        sharded = fully_sharded(cand)
        if sharded is not None:
            pred = fastest_fitting(sharded, cluster)
    return pred


def recommend(cfg: Any, cluster: Cluster, *, top: int = 3) -> list[Prediction]:
    """Valid layouts for the run's world size whose memory fits a device (under the memory
    policy that makes each fastest: recomputation and offload traffic are part of the
    prediction; fully sharded where nothing fits otherwise), fastest first."""
    ranked = []
    for cand in candidate_configs(cfg, cluster):
        if problems(cand):
            continue
        pred = layout_prediction(cand, cluster)
        if pred is not None:
            ranked.append(pred)
    ranked.sort(key=lambda p: p.step_s)
    return ranked[:top]


def smallest_need(cfg: Any, cluster: Cluster) -> Optional[tuple[float, str]]:
    """(GiB per device, the overrides and memory policy) of the valid layout that needs the
    least memory, fully sharded where it can be; None where no layout is valid. What the
    device would have to hold when `recommend` finds nothing."""
    best: Optional[tuple[float, str]] = None
    for cand in candidate_configs(cfg, cluster):
        if problems(cand):
            continue
        for variant in filter(None, (cand, fully_sharded(cand))):
            for e in estimates(variant, on_gpu=cluster.host is not None):
                if not fits_host(e, cluster):
                    continue
                if best is None or e.total / GIB < best[0]:
                    best = (e.total / GIB,
                            f"{layout_overrides(variant)} (memory {e.policy.name})")
    return best


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
             f"longtrain.planning.costmodel):",
             f"  this layout ({describe_layout(cfg)}): {format_prediction(predict(cfg, cluster))}"]
    best = recommend(cfg, cluster)
    if not best:
        need = smallest_need(cfg, cluster)
        lines.append("  no layout of this world size fits the device memory" + (
            f"; the smallest, {need[1]}, needs {need[0]:.1f} GiB" if need else ""))
        return lines
    lines.append("  recommended layouts (valid, fit memory, fastest first):")
    for i, p in enumerate(best, 1):
        host = f" + {p.host_gib:.1f} GiB on the host" if p.host_gib else ""
        lines.append(f"    {i}. {p.overrides} (memory {p.memory_policy}, "
                     f"{p.memory_gib:.1f} GiB{host}): {format_prediction(p)}")
    return lines


