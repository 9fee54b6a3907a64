"""The sequence layout under context parallelism: the one function that shards tokens,
labels, positions and document ids (nothing else re-derives it).

Zigzag: the global sequence is cut into 2*CP chunks; rank r holds chunks r and 2*CP-1-r, so
every rank does the same causal work.
"""

from __future__ import annotations

import torch


def zigzag_chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    return cp_rank, 2 * cp_size - 1 - cp_rank


def split_for_cp(x: torch.Tensor, *, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's zigzag shard of `x` along `dim` (length must be divisible by 2*cp_size)."""
    if cp_size == 1:
        return x
    length = x.shape[dim]
    if length % (2 * cp_size) != 0:
        raise ValueError(f"sequence length {length} is not divisible by 2*cp = {2 * cp_size}")
    chunks = x.chunk(2 * cp_size, dim=dim)
    first, second = zigzag_chunk_ids(cp_size, cp_rank)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


def zigzag_positions(t_local: int, *, cp_size: int, cp_rank: int,
                     device: torch.device | None = None) -> torch.Tensor:
    """[t_local] int64: the global sequence index of each row of this rank's shard."""
    if cp_size == 1:
        return torch.arange(t_local, device=device)
    length = t_local // 2
    first, second = zigzag_chunk_ids(cp_size, cp_rank)
    rows = torch.arange(length, device=device)
    return torch.cat([first * length + rows, second * length + rows])


def unsplit_from_cp(shards: list[torch.Tensor], *, dim: int = 1) -> torch.Tensor:
    """Inverse of `split_for_cp`: rebuild the global tensor from every rank's shard (in rank order)."""
    cp_size = len(shards)
    if cp_size == 1:
        return shards[0]
    chunks: list[torch.Tensor | None] = [None] * (2 * cp_size)
    for rank, shard in enumerate(shards):
        first, second = zigzag_chunk_ids(cp_size, rank)
        chunks[first], chunks[second] = shard.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)  # type: ignore[arg-type]


def rank_attention_work(doc_lengths: list[int], *, cp_size: int) -> list[float]:
    """Causal same-document (query, key) pairs each rank's zigzag shard computes, for one
    sequence packed from documents of these lengths (their sum divisible by 2 * cp_size):
    max / mean over ranks is the load imbalance of packed data under zigzag."""
    work = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) for n in doc_lengths])
    if work.numel() % (2 * cp_size):
        raise ValueError(f"documents of {work.numel()} tokens in all do not split into "
                         f"2 * cp = {2 * cp_size} chunks")
    chunks = work.view(2 * cp_size, -1).sum(1)
    return [float(chunks[a] + chunks[b]) for a, b in
            (zigzag_chunk_ids(cp_size, r) for r in range(cp_size))]
