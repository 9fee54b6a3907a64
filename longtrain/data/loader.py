"""Global batch -> this DP rank's micro-batches -> this CP rank's sequence shard.

Sample `step * batch_size + j` of the global stream is sequence j of step `step`; DP rank d
takes the d-th contiguous slice of the batch. Everything is a function of (seed, step), so a
run resumes at any step exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from longtrain.config.schema import DataConfig
from longtrain.data.synthetic import passkey_sample, passkey_tokens
from longtrain.parallel.layout import split_for_cp

IGNORE_INDEX = -100


@dataclass
class MicroBatch:
    """This rank's shard: every tensor [B, T_local] int64."""

    tokens_bt: torch.Tensor
    labels_bt: torch.Tensor
    positions_bt: torch.Tensor
    doc_ids_bt: Optional[torch.Tensor] = None

    def to(self, device: torch.device) -> "MicroBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return MicroBatch(move(self.tokens_bt), move(self.labels_bt), move(self.positions_bt),
                          move(self.doc_ids_bt))

    @property
    def num_targets(self) -> int:
        return int((self.labels_bt != IGNORE_INDEX).sum())


_SOURCES = {"synthetic": {"passkey": passkey_tokens}}


def source_problems(cfg: DataConfig) -> list[str]:
    if cfg.source not in _SOURCES:
        return [f"data.source={cfg.source!r} is not one of {sorted(_SOURCES)}"]
    if cfg.task not in _SOURCES[cfg.source]:
        return [f"data.task={cfg.task!r} is not one of {sorted(_SOURCES[cfg.source])} "
                f"for data.source={cfg.source!r}"]
    if cfg.source == "synthetic" and cfg.task == "passkey" and cfg.seq_len >= 1:
        # The task has a fixed-length intro, needle and question: fail here, not at step 0.
        try:
            passkey_sample(seq_len=cfg.seq_len, seed=cfg.seed, index=0)
        except ValueError as exc:
            return [str(exc)]
    return []


def global_sequences(cfg: DataConfig, indices: list[int]) -> torch.Tensor:
    """[N, seq_len + 1] token ids of the given global sample indices."""
    return _SOURCES[cfg.source][cfg.task](seq_len=cfg.seq_len, seed=cfg.seed, indices=indices)


def shard_sequences(seq_bt1: torch.Tensor, *, cp_size: int, cp_rank: int) -> MicroBatch:
    """Inputs/targets from [B, T+1] ids, then this CP rank's zigzag shard of each."""
    tokens = seq_bt1[:, :-1]
    # a copy: at cp=1 a view would alias the tokens, and callers may mask labels in place
    labels = seq_bt1[:, 1:].clone()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    split = lambda t: split_for_cp(t, cp_size=cp_size, cp_rank=cp_rank, dim=1).contiguous()  # noqa: E731
    return MicroBatch(split(tokens), split(labels), split(positions))


def micro_batches(cfg: DataConfig, *, step: int, dp_size: int, dp_rank: int, cp_size: int,
                  cp_rank: int) -> list[MicroBatch]:
    """This rank's micro-batches of global step `step`."""
    per_dp = cfg.batch_size // dp_size
    first = step * cfg.batch_size + dp_rank * per_dp
    out = []
    for start in range(first, first + per_dp, cfg.micro_batch_size):
        seq = global_sequences(cfg, list(range(start, start + cfg.micro_batch_size)))
        out.append(shard_sequences(seq, cp_size=cp_size, cp_rank=cp_rank))
    return out


def iterate(cfg: DataConfig, *, start_step: int, dp_size: int, dp_rank: int, cp_size: int,
            cp_rank: int) -> Iterator[list[MicroBatch]]:
    step = start_step
    while True:
        yield micro_batches(cfg, step=step, dp_size=dp_size, dp_rank=dp_rank, cp_size=cp_size,
                            cp_rank=cp_rank)
        step += 1
