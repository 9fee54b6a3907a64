"""Canonical tensors held in pieces: what a rank writes to and reads from a DCP checkpoint
without ever assembling a full tensor.

A rank holds a parameter (or its fp32 master, or an AdamW moment) in one of three ways:

- whole (its TP shard, as the plain optimizer keeps it);
- a DTensor sharded over the CP x DP ranks (`optim.zero=3`, FSDP2): one block of rows;
- a flat fragment (`optim.zero=1|2`, DeepSpeed): a contiguous range of the flattened
  tensor, which is up to three rectangles (a partial first row, whole rows, a partial last
  row).

`held_parts` turns each into rectangles of the rank's TP-local tensor, and
`native.canonical_views` intersects those with the canonical pieces (q / k / v of a fused
projection, the TP shard's place in the full tensor) into a `Chunked`: the canonical shape
and the (global offsets, local view) pairs this rank has. DCP writes and reads each pair as
a chunk (through `SavePlanner` / `LoadPlanner` below), so a save never gathers, and a load
reads exactly the overlap of each local chunk with whatever chunks another layout wrote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                   TensorProperties)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

__all__ = ["Chunked", "Fragment", "LoadPlanner", "Rect", "SavePlanner", "flat_rects",
           "held_parts"]


@dataclass(frozen=True)
class Rect:
    """A box of a tensor: where it starts and how long it is along each dimension."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]

    @classmethod
    def whole(cls, shape: Sequence[int]) -> "Rect":
        return cls(tuple(0 for _ in shape), tuple(shape))

    def intersect(self, other: "Rect") -> Optional["Rect"]:
        starts, lengths = [], []
        for a, n, b, m in zip(self.starts, self.lengths, other.starts, other.lengths):
            lo, hi = max(a, b), min(a + n, b + m)
            if hi <= lo:
                return None
            starts.append(lo)
            lengths.append(hi - lo)
        return Rect(tuple(starts), tuple(lengths))

    def view(self, tensor: torch.Tensor, *, origin: "Rect") -> torch.Tensor:
        """The part of `tensor` (which holds the box `origin`) that this box covers."""
        for dim, (start, length, base) in enumerate(zip(self.starts, self.lengths, origin.starts)):
            tensor = tensor.narrow(dim, start - base, length)
        return tensor


@dataclass(frozen=True)
class Fragment:
    """A contiguous range [start, start + numel) of a tensor of `shape`, flattened row-major:
    `flat` holds it (ZeRO-1/2's partition of the fp32 masters and moments)."""

    shape: tuple[int, ...]
    start: int
    flat: torch.Tensor


def flat_rects(shape: Sequence[int], start: int, numel: int) -> list[tuple[Rect, int]]:
    """The rectangles a flat range covers in a tensor of `shape` (1-D or 2-D), each with its
    offset into the range: a partial first row, the whole rows, a partial last row."""
    if numel <= 0:
        return []
    if len(shape) == 1:
        return [(Rect((start,), (numel,)), 0)]
    if len(shape) != 2:
        raise ValueError(f"flat fragments of {len(shape)}-D tensors (shape {tuple(shape)}) "
                         f"are not supported")
    cols = shape[1]
    out: list[tuple[Rect, int]] = []
    pos, end = start, start + numel
    row, col = divmod(pos, cols)
    if col:  # a partial first row
        n = min(cols - col, end - pos)
        out.append((Rect((row, col), (1, n)), pos - start))
        pos += n
    rows = (end - pos) // cols
    if rows:
        out.append((Rect((pos // cols, 0), (rows, cols)), pos - start))
        pos += rows * cols
    if pos < end:  # a partial last row
        out.append((Rect((pos // cols, 0), (1, end - pos)), pos - start))
    return out


def held_parts(held: Any) -> list[tuple[Rect, torch.Tensor]]:
    """The boxes of a (TP-local) tensor this rank holds, each with the local tensor holding
    it: a plain tensor is one box, a DTensor its local shard, a `Fragment` up to three."""
    from torch.distributed.tensor import DTensor

    if isinstance(held, Fragment):
        return [(rect, held.flat.narrow(0, offset, math.prod(rect.lengths)).view(rect.lengths))
                for rect, offset in flat_rects(held.shape, held.start, held.flat.numel())]
    if isinstance(held, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = held.to_local()
        if local.numel() == 0:
            return []
        sizes, offsets = compute_local_shape_and_global_offset(
            held.shape, held.device_mesh, held.placements)
        return [(Rect(tuple(offsets), tuple(sizes)), local)]
    return [(Rect.whole(held.shape), held)]


class Chunked:
    """A canonical tensor of `shape` of which this rank holds `parts`: (global offsets, local
    tensor) pairs, possibly none. DCP saves and loads it through the checkpointable protocol
    DTensor uses (`__create_write_items__`, `__create_chunk_list__`,
    `__get_tensor_shard__`)."""

    def __init__(self, shape: Sequence[int], parts: list[tuple[tuple[int, ...], torch.Tensor]]):
        self.shape = torch.Size(shape)
        self.parts = parts

    def size(self) -> torch.Size:
        return self.shape

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(offsets)),
                          type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(torch.Size(offsets), local.shape),
                              properties=TensorProperties.create_from_tensor(local),
                              size=self.shape))
                for offsets, local in self.parts]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(offsets), local.shape)
                for offsets, local in self.parts]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        for offsets, local in self.parts:
            if torch.Size(offsets) == index.offset:
                return local
        raise ValueError(f"{index.fqn}: this rank holds no chunk at {tuple(index.offset)}")


def _lookup(state_dict: dict[str, Any], index: MetadataIndex) -> Optional[torch.Tensor]:
    obj = state_dict.get(index.fqn)
    return obj.__get_tensor_shard__(index) if isinstance(obj, Chunked) else None


class SavePlanner(DefaultSavePlanner):
    """DCP's default planner, which also finds a `Chunked` value's chunks."""

    def lookup_object(self, index: MetadataIndex) -> Any:
        found = _lookup(self.state_dict, index)
        return super().lookup_object(index) if found is None else found


class LoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, which also fills a `Chunked` value's chunks in place."""

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Any = None,
                       is_coordinator: bool = False) -> None:
        # DCP's state-dict walk knows only tensors and plain values: it would replace
        # ours with None
        chunked = {k: v for k, v in state_dict.items() if isinstance(v, Chunked)}
        super().set_up_planner(state_dict, metadata, is_coordinator)
        state_dict.update(chunked)
        self.state_dict.update(chunked)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        found = _lookup(self.state_dict, index)
        return super().lookup_tensor(index) if found is None else found
