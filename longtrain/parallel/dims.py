"""Parallel degrees, validated up front: TP x CP x DP over the world."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelDims:
    """World = tp * cp * dp. Rank order follows megatron-core: TP fastest, then CP, then DP."""

    world_size: int
    tp: int
    cp: int

    @classmethod
    def from_config(cls, parallel) -> "ParallelDims":
        """From a `ParallelConfig` (`parallel.world_size`, `parallel.tp`, `parallel.cp`)."""
        return cls(parallel.world_size, parallel.tp, parallel.cp)

    def problems(self) -> list[str]:
        """Every violated constraint as a message naming fields and values (empty if valid)."""
        out: list[str] = []
        for name, value in (("parallel.world_size", self.world_size), ("parallel.tp", self.tp),
                            ("parallel.cp", self.cp)):
            if value < 1:
                out.append(f"{name}={value} must be >= 1")
        if out:
            return out
        if self.world_size % (self.tp * self.cp) != 0:
            out.append(
                f"parallel.world_size={self.world_size} is not divisible by "
                f"parallel.tp * parallel.cp = {self.tp} * {self.cp} = {self.tp * self.cp}"
            )
        return out

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.cp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, cp_rank, dp_rank) of a global rank, megatron-core's order."""
        return rank % self.tp, (rank // self.tp) % self.cp, rank // (self.tp * self.cp)

    def groups(self) -> dict[str, list[list[int]]]:
        """The global ranks of every TP, CP and DP group, each sorted (megatron-core's order:
        a group holds the ranks whose other two coordinates agree)."""
        out: dict[str, list[list[int]]] = {}
        for axis, name in enumerate(("tp", "cp", "dp")):
            members: dict[tuple[int, ...], list[int]] = {}
            for rank in range(self.world_size):
                c = self.coords(rank)
                members.setdefault(c[:axis] + c[axis + 1:], []).append(rank)
            out[name] = sorted(members.values())
        return out

    def describe(self) -> str:
        return f"world={self.world_size} = tp {self.tp} x cp {self.cp} x dp {self.dp}"
