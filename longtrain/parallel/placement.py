"""Which node each rank runs on: ranks ordered by node, so that the groups of the fastest
axes stay inside a node (megatron-core's order: TP fastest, then CP, then DP; see dims.py).

The launcher gets one slot (a placement-group bundle) per rank from the scheduler, each on
some node, in no useful order. `rank_order` gives rank r the r-th slot after grouping the
slots by node, so consecutive ranks share a node: a TP group (tp consecutive ranks) stays
inside one whenever the nodes hold multiples of tp slots, and a CP group (tp * cp consecutive
ranks) whenever they hold multiples of tp * cp. `spans` says which nodes each group spans,
for the launcher's log, its warning and `--check`.
"""

from __future__ import annotations

from longtrain.parallel.dims import ParallelDims


def rank_order(slot_nodes: list[str]) -> list[int]:
    """The slot each rank takes (rank r -> slot index), slots grouped by node: nodes in the
    order their first slot appears, slots of one node in index order."""
    first: dict[str, int] = {}
    for i, node in enumerate(slot_nodes):
        first.setdefault(node, i)
    return sorted(range(len(slot_nodes)), key=lambda i: (first[slot_nodes[i]], i))


def spans(rank_nodes: list[str], dims: ParallelDims
          ) -> dict[str, list[tuple[list[int], list[str]]]]:
    """Per axis (tp, cp, dp): each group's ranks and the distinct nodes they run on (in rank
    order)."""
    if len(rank_nodes) != dims.world_size:
        raise ValueError(f"{len(rank_nodes)} ranks placed for parallel.world_size="
                         f"{dims.world_size}")
    out: dict[str, list[tuple[list[int], list[str]]]] = {}
    for axis, groups in dims.groups().items():
        out[axis] = [(g, list(dict.fromkeys(rank_nodes[r] for r in g))) for g in groups]
    return out


def spanning(rank_nodes: list[str], dims: ParallelDims, axis: str) -> list[list[int]]:
    """The groups of `axis` whose ranks run on more than one node."""
    return [g for g, nodes in spans(rank_nodes, dims)[axis] if len(nodes) > 1]


def span_lines(rank_nodes: list[str], dims: ParallelDims, *, names: dict[str, str] | None = None
               ) -> list[str]:
    """One line per axis: how many of its groups stay inside a node, and the nodes of those
    that do not (`names`: short names for node ids)."""
    names = names or {n: n for n in rank_nodes}
    lines = []
    for axis, groups in spans(rank_nodes, dims).items():
        size = len(groups[0][0])
        if size == 1:
            continue
        inside = sum(1 for _, nodes in groups if len(nodes) == 1)
        line = f"{axis} groups of {size}: {inside} of {len(groups)} inside one node"
        across = [f"ranks {g[0]}..{g[-1]} on {_nodes_text([names[n] for n in nodes])}"
                  for g, nodes in groups if len(nodes) > 1]
        if across:
            line += "; across nodes: " + ", ".join(across[:4]) + (
                f", ... ({len(across)} in all)" if len(across) > 4 else "")
        lines.append(line)
    return lines


def _nodes_text(names: list[str]) -> str:
    return "+".join(names) if len(names) <= 3 else f"{len(names)} nodes ({names[0]}..{names[-1]})"


def planned_nodes(world_size: int, devices_per_node: int) -> list[str]:
    """Ranks ordered by node on full nodes of `devices_per_node` (what `rank_order` gives a
    cluster of such nodes): rank r on node r // devices_per_node."""
    return [f"node{r // max(1, devices_per_node)}" for r in range(world_size)]
