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
from longtrain.data.synthetic import packed_passkey_tokens, passkey_sample, passkey_tokens
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
    if cfg.docs_per_seq < 1:
        return [f"data.docs_per_seq={cfg.docs_per_seq} must be >= 1"]
    if cfg.source == "synthetic" and cfg.task == "passkey" and cfg.seq_len >= 1:
        # The task has a fixed-length intro, needle and question: fail here, not at step 0.
        doc_len = (cfg.seq_len + 1) // cfg.docs_per_seq - 1
        try:
            passkey_sample(seq_len=doc_len, seed=cfg.seed, index=0)
        except ValueError as exc:
            if cfg.docs_per_seq == 1:
                return [str(exc)]
            return [f"data.seq_len={cfg.seq_len} / data.docs_per_seq={cfg.docs_per_seq} leaves "
                    f"documents of {doc_len} tokens, too short for the passkey task ({exc})"]
    return []


def global_batch(cfg: DataConfig, indices: list[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token ids and document ids (None: one document per sequence), [N, seq_len + 1] each,
    of the given global sample indices."""
    if cfg.docs_per_seq > 1:
        return packed_passkey_tokens(seq_len=cfg.seq_len, seed=cfg.seed, indices=indices,
                                     docs_per_seq=cfg.docs_per_seq)
    return _SOURCES[cfg.source][cfg.task](seq_len=cfg.seq_len, seed=cfg.seed, indices=indices), None


def global_sequences(cfg: DataConfig, indices: list[int]) -> torch.Tensor:
    """[N, seq_len + 1] token ids of the given global sample indices."""
    return global_batch(cfg, indices)[0]


def document_positions(doc_bt: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at every document start; [B, T] int64."""
    t = doc_bt.shape[1]
    idx = torch.arange(t, device=doc_bt.device).expand_as(doc_bt)
    starts = torch.ones_like(doc_bt, dtype=torch.bool)
    starts[:, 1:] = doc_bt[:, 1:] != doc_bt[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def shard_sequences(seq_bt1: torch.Tensor, *, cp_size: int, cp_rank: int,
                    doc_bt1: Optional[torch.Tensor] = None) -> MicroBatch:
    """Inputs/targets (and document ids, per-document positions) from [B, T+1] ids, then this
    CP rank's zigzag shard of each: the one place the layout is applied to a batch."""
    tokens = seq_bt1[:, :-1]
    # a copy: at cp=1 a view would alias the tokens, and callers may mask labels in place
    labels = seq_bt1[:, 1:].clone()
    doc_ids = None
    if doc_bt1 is None:
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    else:
        doc_ids = doc_bt1[:, :-1]
        # the last token of a document does not predict the next document's first token
        labels[doc_bt1[:, 1:] != doc_ids] = IGNORE_INDEX
        positions = document_positions(doc_ids)
    split = lambda t: None if t is None else split_for_cp(  # noqa: E731
        t, cp_size=cp_size, cp_rank=cp_rank, dim=1).contiguous()
    return MicroBatch(split(tokens), split(labels), split(positions), split(doc_ids))


def micro_batches(cfg: DataConfig, *, step: int, dp_size: int, dp_rank: int, cp_size: int,
                  cp_rank: int) -> list[MicroBatch]:
    """This rank's micro-batches of global step `step`."""
    per_dp = cfg.batch_size // dp_size
    first = step * cfg.batch_size + dp_rank * per_dp
    out = []
    for start in range(first, first + per_dp, cfg.micro_batch_size):
        seq, docs = global_batch(cfg, list(range(start, start + cfg.micro_batch_size)))
        out.append(shard_sequences(seq, cp_size=cp_size, cp_rank=cp_rank, doc_bt1=docs))
    return out


def iterate(cfg: DataConfig, *, start_step: int, dp_size: int, dp_rank: int, cp_size: int,
            cp_rank: int) -> Iterator[list[MicroBatch]]:
    step = start_step
    while True:
        yield micro_batches(cfg, step=step, dp_size=dp_size, dp_rank=dp_rank, cp_size=cp_size,
                            cp_rank=cp_rank)
        step += 1
