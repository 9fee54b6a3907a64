"""Shared pieces of the sequence-parallel operator tests (LASP, S2): packed document ids, a
rank's slice of heads and of the sequence, and config overrides by dotted name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


def doc_ids(starts_per_row: tuple[list[int], ...], length: int) -> torch.Tensor:
    """[rows, length] int64 document ids: row r's documents start at starts_per_row[r]."""
    doc = torch.zeros(len(starts_per_row), length, dtype=torch.long)
    for row, starts in enumerate(starts_per_row):
        for i, s in enumerate(starts):
            doc[row, s:] = i
    return doc


def float64_inputs(seed: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Seeded float64 randn tensors, drawn in the order of `shapes`."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=gen, dtype=torch.float64)
            for name, shape in shapes.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (`b` the reference)."""
    return float((a - b).abs().max() / b.abs().max())


@dataclass(frozen=True)
class RankSlice:
    """What one rank of a TP x CP world holds: its heads and its zigzag sequence shard."""

    heads: Callable[[int], slice]
    shard: Callable[[torch.Tensor], torch.Tensor]
    ctx: Any


def rank_slice(rt: Any) -> RankSlice:
    from longtrain.attention.base import AttentionContext
    from longtrain.parallel.layout import split_for_cp

    d = rt.dims
    return RankSlice(
        heads=lambda n: slice(rt.tp_rank * n // d.tp, (rt.tp_rank + 1) * n // d.tp),
        shard=lambda t: split_for_cp(t, cp_size=d.cp, cp_rank=rt.cp_rank),
        ctx=AttentionContext(cp_group=rt.cp_group, cp_size=d.cp, cp_rank=rt.cp_rank))


def with_fields(cfg: Any, change: dict[str, Any]) -> Any:
    """Set `section.field` values on a RunConfig (in place); returns it."""
    for dotted, value in change.items():
        section, name = dotted.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg
