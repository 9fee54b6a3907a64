"""`longtrain-train --check`: what a run would do, without starting anything.

Prints the resolved layout (which global ranks form each TP / CP / DP group), the attention
each layer runs, the memory estimate per device against the budget (longtrain.memory.estimate)
and every violated constraint. Each section is printed when the settings it needs are valid.
"""

from __future__ import annotations

from typing import Any

from longtrain.attention.plan import plan_layers
from longtrain.checkpoint.source import source_kind, tokenizer_warnings
from longtrain.config.pattern import pattern_problems
from longtrain.memory.estimate import GIB, Policy, device_budget_bytes, estimates
from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.placement import planned_nodes, span_lines
from longtrain.planning.cluster import cluster_from_config, cluster_problems
from longtrain.planning.search import report_lines
from longtrain.planning.validate import problems

_MAX_GROUPS_SHOWN = 8
# `--check` exit codes: 0 valid and fits; EXIT_BAD_INPUT a violated constraint (the code every
# bad-input error of longtrain-train uses); EXIT_NO_FIT valid, but the memory estimate of the
# configured policy exceeds the budget
EXIT_BAD_INPUT = 2
EXIT_NO_FIT = 3


def _layout(cfg: Any) -> list[str]:
    dims = ParallelDims.from_config(cfg.parallel)
    lines = [f"layout: {dims.describe()} (rank = tp_rank + tp * (cp_rank + cp * dp_rank))"]
    for name, groups in dims.groups().items():
        shown = ", ".join(str(g) for g in groups[:_MAX_GROUPS_SHOWN])
        more = f", ... ({len(groups)} groups)" if len(groups) > _MAX_GROUPS_SHOWN else ""
        lines.append(f"  {name} groups: {shown}{more}")
    cluster = cluster_from_config(cfg) if not cluster_problems(cfg) else None
    if cluster is not None and cluster.nodes > 1:
        # the launcher orders ranks by node: on full nodes, rank r runs on node r // per node
        nodes = planned_nodes(dims.world_size, cluster.devices_per_node)
        lines.append(f"  nodes ({cluster.name}: {cluster.devices_per_node} devices each, ranks "
                     f"ordered by node):")
        lines += [f"    {line}" for line in span_lines(nodes, dims)]
    return lines


def attention_lines(cfg: Any) -> list[str]:
    """The `--check` line naming the attention each layer runs (runs of equal layers joined)."""
    plan = plan_layers(cfg.attention, cfg.model, cp=cfg.parallel.cp, strict=False)
    per_layer = [p.label for p in plan]
    runs: list[str] = []
    start = 0
    for i in range(1, len(per_layer) + 1):
        if i == len(per_layer) or per_layer[i] != per_layer[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            runs.append(f"{span}: {per_layer[start]}")
            start = i
    return [f"attention per layer ({len(per_layer)} layers): " + "; ".join(runs)]


def _memory(cfg: Any) -> tuple[list[str], bool]:
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
    return lines, mine.total <= budget


# rope.scaling values that read rope.factor
_FACTOR_SCALINGS = ("linear", "dynamic_ntk", "yarn", "llama3")


def _longest_seq_len(cfg: Any) -> int:
    return max([cfg.data.seq_len, *(s.seq_len for s in cfg.train.schedule)])


def _original_length(cfg: Any) -> int:
    return int(cfg.rope.original_max_position_embeddings or cfg.model.max_position_embeddings)


def describe_init_and_rope(cfg: Any) -> str:
    """One line: where the weights come from and what RoPE does to positions."""
    source = cfg.init_from
    if not source:
        init = "init from scratch"
    else:
        try:
            kind = {"native": "native checkpoint", "hf": "Hugging Face"}[source_kind(str(source))]
        except (OSError, ValueError):
            kind = "unreadable"
        init = f"init from {source} ({kind})"
    rope = cfg.rope
    longest = _longest_seq_len(cfg)
    if rope.scaling in _FACTOR_SCALINGS:
        how = (f"rope {rope.scaling} x{rope.factor:g}, theta {rope.theta:g}, original "
               f"{_original_length(cfg)} -> {int(_original_length(cfg) * rope.factor)} positions")
    elif rope.scaling == "none":
        how = f"rope unscaled, theta {rope.theta:g}"
    else:
        how = f"rope {rope.scaling}, theta {rope.theta:g}, original {_original_length(cfg)}"
    return f"{init}; {how}; training at seq_len up to {longest}"


def rope_warnings(cfg: Any) -> list[str]:
    """Settings that are legal but likely not what the user meant."""
    rope = cfg.rope
    out = []
    longest = _longest_seq_len(cfg)
    original = _original_length(cfg)
    if rope.scaling not in _FACTOR_SCALINGS and rope.factor != 1.0:
        out.append(f"rope.factor={rope.factor:g} is ignored by rope.scaling={rope.scaling} "
                   f"(it is read by rope.scaling={'|'.join(_FACTOR_SCALINGS)})")
    if rope.scaling in _FACTOR_SCALINGS and longest > rope.factor * original:
        out.append(f"data.seq_len={longest} exceeds rope.factor x original length = "
                   f"{rope.factor:g} x {original} = {int(rope.factor * original)}: positions "
                   f"beyond it are extrapolated; raise rope.factor to "
                   f"{-(-longest // original)} or more")
    elif rope.scaling == "none" and cfg.init_from and longest > original:
        out.append(f"data.seq_len={longest} exceeds the checkpoint's length {original} with "
                   f"rope.scaling=none: positions beyond it are extrapolated (choose a "
                   f"rope.scaling, e.g. rope=yarn rope.factor={-(-longest // original)})")
    return out


def check_report(cfg: Any) -> tuple[str, list[str], bool]:
    """(the report, the violated constraints, whether the configured memory policy's estimate
    fits the budget) for a typed RunConfig."""
    found = problems(cfg)
    dims = ParallelDims.from_config(cfg.parallel)
    lines = [f"longtrain-train --check: {cfg.model.name} model, seq_len {cfg.data.seq_len}, "
             f"micro_batch {cfg.data.micro_batch_size}, batch {cfg.data.batch_size}",
             describe_init_and_rope(cfg)]

    lines += [f"warning: {w}" for w in [*rope_warnings(cfg), *tokenizer_warnings(cfg)]]
    if not dims.problems():
        lines += _layout(cfg)
    if not pattern_problems(cfg.model.layer_pattern) and cfg.model.num_layers >= 1:
        lines += attention_lines(cfg)
    fits = True
    if not found:
        memory_lines, fits = _memory(cfg)
        lines += memory_lines

        lines += report_lines(cfg)
    if found:
        lines.append(f"constraints violated ({len(found)}):")
        lines += [f"  - {p}" for p in found]
    else:
        lines.append("constraints: all satisfied")
    if not found and not fits:
        lines.append(f"memory: the estimate does NOT fit the budget (exit {EXIT_NO_FIT})")
    return "\n".join(lines), found, fits
