"""`longtrain-train --check`: what a run would do, without starting anything.

Prints the resolved layout (which global ranks form each TP / CP / DP group), the attention
each layer runs, the memory estimate per device against the budget (longtrain.memory.planner)
and every violated constraint. Each section is printed when the settings it needs are valid.
"""

from __future__ import annotations

from typing import Any

from longtrain.parallel.dims import ParallelDims

_MAX_GROUPS_SHOWN = 8


def _layout(cfg: Any) -> list[str]:
    dims = ParallelDims.from_config(cfg.parallel)
    lines = [f"layout: {dims.describe()} (rank = tp_rank + tp * (cp_rank + cp * dp_rank))"]
    for name, groups in dims.groups().items():
        shown = ", ".join(str(g) for g in groups[:_MAX_GROUPS_SHOWN])
        more = f", ... ({len(groups)} groups)" if len(groups) > _MAX_GROUPS_SHOWN else ""
        lines.append(f"  {name} groups: {shown}{more}")
    return lines


def _attention(cfg: Any) -> list[str]:
    from longtrain.attention.s2 import dense_layers
    from longtrain.model.llama import layer_kinds

    backend = cfg.attention.backend
    kinds = layer_kinds(cfg.model, linear_default=backend in ("lasp1", "lasp2"))
    cp = cfg.parallel.cp
    per_layer = []
    for i, kind in enumerate(kinds):
        if kind == "linear":
            per_layer.append(f"linear ({backend if backend in ('lasp1', 'lasp2') else 'lasp2'})")
        elif backend in ("lasp1", "lasp2"):
            per_layer.append(f"softmax ({cfg.attention.softmax})")
        elif backend == "s2" and dense_layers(cfg.attention.s2, len(kinds))[i]:
            per_layer.append("dense" if cp == 1 else "ring (s2 dense layer)")
        else:
            per_layer.append(backend)
    runs: list[str] = []
    start = 0
    for i in range(1, len(per_layer) + 1):
        if i == len(per_layer) or per_layer[i] != per_layer[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            runs.append(f"{span}: {per_layer[start]}")
            start = i
    return [f"attention per layer ({len(kinds)} layers): " + "; ".join(runs)]


def _memory(cfg: Any) -> list[str]:
    from longtrain.memory.planner import GIB, Policy, device_budget_bytes, estimates
    from longtrain.parallel.costmodel import cluster_from_config

    import torch

    cluster = cluster_from_config(cfg)
    # a described cluster: its devices, not this machine, hold the run
    on_gpu = torch.cuda.is_available() or cluster is not None
    policy = Policy(cfg.memory.activations, cfg.memory.checkpointing,
                    cfg.memory.offload and on_gpu)
    table = estimates(cfg, on_gpu=on_gpu)
    mine = next(e for e in table if e.policy == policy)
    budget = (cluster.memory_gib * GIB if cluster is not None and cfg.memory.budget_gib is None
              else device_budget_bytes(cfg))
    verdict = "fits" if mine.total <= budget else "does NOT fit"
    lines = [f"memory per device (estimate, memory {policy.name}): {mine.total / GIB:.3f} GiB "
             f"= activations {mine.activations / GIB:.3f} + weights, gradients and optimizer "
             f"{mine.static / GIB:.3f}; budget {budget / GIB:.2f} GiB: {verdict}"]
    if mine.total > budget:
        fits = [e for e in table if e.total <= budget]
        lines.append("  " + (f"memory=auto would pick {min(fits, key=lambda e: e.cost).policy.name}"
                             if fits else "no memory policy fits: raise parallel.cp or "
                             "parallel.tp, or lower data.micro_batch_size"))
    return lines


def check_report(cfg: Any) -> tuple[str, list[str]]:
    """(the report, the violated constraints) for a typed RunConfig."""
    from longtrain.config.validate import problems
    from longtrain.model.llama import pattern_problems

    found = problems(cfg)
    dims = ParallelDims.from_config(cfg.parallel)
    lines = [f"longtrain-train --check: {cfg.model.name} model, seq_len {cfg.data.seq_len}, "
             f"micro_batch {cfg.data.micro_batch_size}, batch {cfg.data.batch_size}"]
    if not dims.problems():
        lines += _layout(cfg)
    if not pattern_problems(cfg.model.layer_pattern) and cfg.model.num_layers >= 1:
        lines += _attention(cfg)
    if not found:
        lines += _memory(cfg)
        from longtrain.parallel.costmodel import report_lines

        lines += report_lines(cfg)
    if found:
        lines.append(f"constraints violated ({len(found)}):")
        lines += [f"  - {p}" for p in found]
    else:
        lines.append("constraints: all satisfied")
    return "\n".join(lines), found
