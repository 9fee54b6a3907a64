"""The S2-Attention (DKernel-style) per-head block-sparse causal pattern.

Blocks are `block_size` positions wide. Query block i of global head g may read key block j iff
j <= i (causal) and one of: g is a dense head (the last `num_dense_heads` heads), j is inside
the local window (i - j < local_blocks), or j is a vertical block of head g
((j + g * head_step + 1) % vert_stride == 0). Different heads use different vertical phases, so
the heads together cover every causal block pair while each reads only a fraction of them.
The pattern is defined on global heads so that a tensor-parallel slice of heads (given by
`head_offset` in the op) computes exactly what the unsliced model computes. See README.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

_FIELD = "attention.s2"


@dataclass(frozen=True)
class S2Pattern:
    """Heterogeneous per-head block-sparse causal pattern (see module docstring)."""

    num_heads: int
    block_size: int = 64
    local_blocks: int = 4
    vert_stride: int = 8
    homo_head: bool = False
    num_dense_heads: int = 0

    def problems(self) -> list[str]:
        """Every invalid field, named with its value; empty when the pattern is valid."""
        out: list[str] = []
        if self.num_heads < 1:
            out.append(f"{_FIELD}.num_heads={self.num_heads} must be >= 1")
        bs = self.block_size
        if bs < 16 or bs & (bs - 1) != 0:
            out.append(f"{_FIELD}.block_size={bs} must be a power of two >= 16")
        if self.local_blocks < 1:
            out.append(f"{_FIELD}.local_blocks={self.local_blocks} must be >= 1")
        if self.vert_stride < 1:
            out.append(f"{_FIELD}.vert_stride={self.vert_stride} must be >= 1")
        if not 0 <= self.num_dense_heads <= max(self.num_heads, 0):
            out.append(f"{_FIELD}.num_dense_heads={self.num_dense_heads} must be in "
                       f"[0, num_heads={self.num_heads}]")
        return out

    def check(self) -> None:
        """Raise ValueError listing `problems()` if there are any."""
        probs = self.problems()
        if probs:
            raise ValueError("invalid S2Pattern: " + "; ".join(probs))

    def head_step(self) -> int:
        """Phase increment between consecutive heads (0 when every head shares one phase)."""
        if self.homo_head:
            return 0
        if self.num_heads >= self.vert_stride:
            return 1
        return self.vert_stride // self.num_heads

    def is_dense_head(self, g: int) -> bool:
        """Whether global head g attends densely (causal, no sparsity)."""
        return g >= self.num_heads - self.num_dense_heads

    def vertical_phase(self, g: int) -> int:
        """r in [0, vert_stride): key block j is vertical for head g iff j % vert_stride == r."""
        return -(g * self.head_step() + 1) % self.vert_stride

    def block_allowed(self, i: int, j: int, g: int) -> bool:
        """Whether query block i of global head g may read key block j."""
        if j > i:
            return False
        if self.is_dense_head(g) or i - j < self.local_blocks:
            return True
        return j % self.vert_stride == self.vertical_phase(g)

    def block_mask(self, n_q_blocks: int, n_k_blocks: int, heads: Sequence[int],
                   q_block_offset: int = 0) -> torch.Tensor:
        """bool [len(heads), n_q_blocks, n_k_blocks]; row r is query block q_block_offset + r."""
        i = torch.arange(n_q_blocks).view(1, -1, 1) + q_block_offset
        j = torch.arange(n_k_blocks).view(1, 1, -1)
        heads = list(heads)
        phase = torch.tensor([self.vertical_phase(g) for g in heads], dtype=torch.long)
        dense = torch.tensor([self.is_dense_head(g) for g in heads], dtype=torch.bool)
        vertical = (j % self.vert_stride) == phase.view(-1, 1, 1)
        allowed = dense.view(-1, 1, 1) | (i - j < self.local_blocks) | vertical
        return allowed & (j <= i)

    def key_blocks(self, i: int, g: int) -> list[int]:
        """Allowed key blocks of query block i for global head g, ascending."""
        if self.is_dense_head(g):
            return list(range(i + 1))
        lo = max(0, i - self.local_blocks + 1)
        r = self.vertical_phase(g)
        vertical = range(r, lo, self.vert_stride)
        return list(vertical) + list(range(lo, i + 1))

    def query_blocks(self, j: int, g: int, n_q_blocks: int) -> list[int]:
        """Query blocks i < n_q_blocks that read key block j for global head g, ascending."""
        return [i for i in range(j, n_q_blocks) if self.block_allowed(i, j, g)]

    def uncovered(self, n_blocks: int) -> list[tuple[int, int]]:
        """Causal block pairs (i, j), i < n_blocks, that no head reads (empty: full coverage)."""
        if self.num_dense_heads > 0:
            return []
        phases = {self.vertical_phase(g) for g in range(self.num_heads)}
        return [(i, j) for i in range(n_blocks) for j in range(i - self.local_blocks + 1)
                if j % self.vert_stride not in phases]
