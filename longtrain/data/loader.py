"""Global batch -> this DP rank's micro-batches -> this CP rank's sequence shard.

Sample `step * batch_size + j` of the global stream is sequence j of step `step`; DP rank d
takes the d-th contiguous slice of the batch. Every source addresses global sequence i
directly: synthetic tasks generate it from (seed, i), a packed corpus reads a fixed slice of
its memory-mapped tokens (`packed.py`), a stream reads forward to it (`streaming.py`). So
everything is a function of (seed, step) and a run resumes at any step exactly: the position
to store in a checkpoint is the step (`data_state`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from longtrain.config.schema import DataConfig
from longtrain.data.packed import open_packed
from longtrain.data.prefetch import prefetch
from longtrain.data.streaming import StreamCursor
from longtrain.data.synthetic import (TASKS, packed_task_tokens, task_answer_mask, task_problems,
                                      task_tokens)
from longtrain.data.tokenizer import BYTE, load_tokenizer, tokenizer_problems, without_source
from longtrain.parallel.layout import split_for_cp

IGNORE_INDEX = -100


@dataclass
class MicroBatch:
    """This rank's shard: every tensor [B, T_local] int64."""

    tokens_bt: torch.Tensor
    labels_bt: torch.Tensor
    positions_bt: torch.Tensor
    doc_ids_bt: Optional[torch.Tensor] = None
    # float32 loss weight of each target (None: every target weighs 1)
    weights_bt: Optional[torch.Tensor] = None

    def to(self, device: torch.device) -> "MicroBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return MicroBatch(move(self.tokens_bt), move(self.labels_bt), move(self.positions_bt),
                          move(self.doc_ids_bt), move(self.weights_bt))

    @property
    def num_targets(self) -> int:
        return int((self.labels_bt != IGNORE_INDEX).sum())

    @property
    def target_weight(self) -> float:
        """The loss denominator's share of this micro-batch: its targets' summed weight."""
        if self.weights_bt is None:
            return float(self.num_targets)
        return float((self.weights_bt * (self.labels_bt != IGNORE_INDEX)).sum())


SOURCES = ("synthetic", "files", "hf")


def _synthetic_problems(cfg: DataConfig) -> list[str]:
    if not cfg.answer_loss_weight > 0:
        return [f"data.answer_loss_weight={cfg.answer_loss_weight} must be > 0"]
    if cfg.task not in TASKS:
        return [f"data.task={cfg.task!r} is not one of {sorted(TASKS)} for "
                f"data.source='synthetic'"]
    if cfg.seq_len < 1 or tokenizer_problems(cfg.tokenizer):
        return []
    try:
        tok = load_tokenizer(cfg.tokenizer)
    except ValueError as exc:
        return [str(exc)]
    return task_problems(cfg.task, seq_len=cfg.seq_len, docs_per_seq=cfg.docs_per_seq,
                         seed=cfg.seed, tokenizer=tok)


def _corpus_problems(cfg: DataConfig) -> list[str]:
    out = []
    if cfg.source == "files":
        if not cfg.path:
            out.append("data=files needs data.path=<a file, a directory or a glob>")
        elif not any(ch in cfg.path for ch in "*?[") and not os.path.exists(cfg.path):
            out.append(f"data.path={cfg.path!r} does not exist")
        if cfg.streaming:
            out.append("data.streaming=true is for data=hf; local files are packed once on "
                       "the driver and memory-mapped")
    if cfg.source == "hf" and not cfg.name:
        out.append("data=hf needs data.name=<a dataset on the hub or a local dataset directory>")
    if not cfg.text_field:
        out.append("data.text_field must name the record field holding the text")
    if cfg.upsample_threshold < 0:
        out.append(f"data.upsample_threshold={cfg.upsample_threshold} must be >= 0 (0 disables)")
    if cfg.upsample_factor < 1:
        out.append(f"data.upsample_factor={cfg.upsample_factor} must be >= 1")
    if cfg.streaming and cfg.upsample_threshold > 0:
        out.append("data.upsample_threshold needs the whole corpus; it is not available with "
                   "data.streaming=true")
    if cfg.num_proc is not None and cfg.num_proc < 1:
        out.append(f"data.num_proc={cfg.num_proc} must be >= 1 (or null: automatic)")
    if cfg.shuffle_buffer < 1:
        out.append(f"data.shuffle_buffer={cfg.shuffle_buffer} must be >= 1")
    return out


def source_problems(cfg: DataConfig) -> list[str]:
    """Every static problem of the data settings (files are checked for existence here; their
    contents when the driver prepares them)."""
    if cfg.source not in SOURCES:
        return [f"data.source={cfg.source!r} is not one of {list(SOURCES)} (data=synthetic|"
                f"files|hf)"]
    out = tokenizer_problems(cfg.tokenizer)
    if cfg.docs_per_seq < 1:
        out.append(f"data.docs_per_seq={cfg.docs_per_seq} must be >= 1")
    elif cfg.source == "synthetic":
        out += _synthetic_problems(cfg)
    if cfg.source != "synthetic":
        out += _corpus_problems(cfg)
        if cfg.answer_loss_weight != 1.0:
            out.append(f"data.answer_loss_weight={cfg.answer_loss_weight} weighs the answers "
                       f"of the synthetic tasks; data.source={cfg.source!r} has none (leave it 1)")
    if cfg.prefetch < 0:
        out.append(f"data.prefetch={cfg.prefetch} must be >= 0 (0: no prefetching)")
    return out


def stream_cursor(cfg: DataConfig) -> Optional[StreamCursor]:
    """A reader's position in `cfg`'s stream (None unless data.streaming): pass it to every
    `global_batch` of that reader, so consecutive batches continue the stream."""
    return StreamCursor(cfg) if cfg.streaming else None


def global_batch(cfg: DataConfig, indices: list[int], *,
                 cursor: Optional[StreamCursor] = None
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token ids and document ids (None: one document per sequence), [N, seq_len + 1] each,
    of the given global sample indices. `cursor` (data.streaming): the reader's position in
    the stream, from `stream_cursor`; without one the stream is read from its start."""
    if cfg.source == "synthetic":
        tok = load_tokenizer(cfg.tokenizer)
        if cfg.docs_per_seq > 1:
            return packed_task_tokens(cfg.task, seq_len=cfg.seq_len, seed=cfg.seed,
                                      indices=indices, docs_per_seq=cfg.docs_per_seq,
                                      tokenizer=tok)
        return task_tokens(cfg.task, seq_len=cfg.seq_len, seed=cfg.seed, indices=indices,
                           tokenizer=tok), None
    if cfg.streaming:
        return (cursor if cursor is not None else stream_cursor(cfg)).batch(indices)

    if cfg.packed is None:
        raise ValueError(f"data.source={cfg.source!r} reads a packed corpus, and data.packed is "
                         f"not set: prepare the data on the driver first "
                         f"(longtrain.data.prepare.prepare_data)")
    return open_packed(cfg.packed).batch(indices, seq_len=cfg.seq_len, seed=cfg.seed)


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


def answer_weights(cfg: DataConfig, indices: list[int]) -> Optional[torch.Tensor]:
    """[N, seq_len + 1] float32 loss weight of each token of `global_batch(cfg, indices)` as a
    target: `data.answer_loss_weight` on the synthetic tasks' answers, 1 elsewhere; None when
    every weight is 1."""
    if cfg.source != "synthetic" or cfg.answer_loss_weight == 1.0:
        return None
    mask = task_answer_mask(cfg.task, seq_len=cfg.seq_len, seed=cfg.seed, indices=indices,
                            docs_per_seq=cfg.docs_per_seq, tokenizer=load_tokenizer(cfg.tokenizer))
    return torch.where(mask, cfg.answer_loss_weight, 1.0).float()


def shard_sequences(seq_bt1: torch.Tensor, *, cp_size: int, cp_rank: int,
                    doc_bt1: Optional[torch.Tensor] = None,
                    weight_bt1: Optional[torch.Tensor] = None) -> MicroBatch:
    """Inputs/targets (and document ids, per-document positions, target weights) from
    [B, T+1] ids, then this CP rank's zigzag shard of each: the one place the layout is
    applied to a batch. `weight_bt1[:, j]` weighs token j as a target."""
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
    weights = None if weight_bt1 is None else weight_bt1[:, 1:]
    return MicroBatch(split(tokens), split(labels), split(positions), split(doc_ids),
                      split(weights))


def micro_batches(cfg: DataConfig, *, step: int, dp_size: int, dp_rank: int, cp_size: int,
                  cp_rank: int, cursor: Optional[StreamCursor] = None) -> list[MicroBatch]:
    """This rank's micro-batches of global step `step` (`cursor`: see `global_batch`)."""
    per_dp = cfg.batch_size // dp_size
    first = step * cfg.batch_size + dp_rank * per_dp
    out = []
    for start in range(first, first + per_dp, cfg.micro_batch_size):
        indices = list(range(start, start + cfg.micro_batch_size))
        seq, docs = global_batch(cfg, indices, cursor=cursor)
        out.append(shard_sequences(seq, cp_size=cp_size, cp_rank=cp_rank, doc_bt1=docs,
                                   weight_bt1=answer_weights(cfg, indices)))
    return out


def iterate(cfg: DataConfig, *, start_step: int, dp_size: int, dp_rank: int, cp_size: int,
            cp_rank: int) -> Iterator[list[MicroBatch]]:
    """This rank's micro-batches of steps start_step, start_step + 1, ... (endless)."""
    step = start_step
    # the iterator is the stream's one reader in this process
    cursor = stream_cursor(cfg)
    while True:
        yield micro_batches(cfg, step=step, dp_size=dp_size, dp_rank=dp_rank, cp_size=cp_size,
                            cp_rank=cp_rank, cursor=cursor)
        step += 1


def prefetched(cfg: DataConfig, source: Iterator[list[MicroBatch]]) -> Iterator[list[MicroBatch]]:
    """`source` built `data.prefetch` steps ahead on a background thread (close() it)."""
    return prefetch(source, depth=cfg.prefetch)


def data_state(cfg: DataConfig, *, step: int) -> dict:
    """The data position to store in a checkpoint: resuming at `step` with the same data
    settings yields exactly the sequences an uninterrupted run would have seen."""
    corpus = cfg.packed and os.path.basename(os.path.normpath(cfg.packed))
    tokenizer = without_source(cfg.tokenizer)
    return {"step": step, "sequences_consumed": step * cfg.batch_size, "seed": cfg.seed,
            "source": cfg.source, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
            "corpus": corpus or (cfg.task if cfg.source == "synthetic" else cfg.name),
            # not compared on resume; what an export of this checkpoint carries as its tokenizer
            "tokenizer": tokenizer if tokenizer == BYTE else os.path.abspath(tokenizer)}


def check_resume(cfg: DataConfig, state: dict) -> int:
    """The step to resume at from a stored `data_state`; refuses data settings that would
    not continue the same sequence stream (naming the field)."""
    now = data_state(cfg, step=int(state["step"]))
    for key in ("seed", "source", "seq_len", "batch_size", "corpus"):
        if now[key] != state.get(key):
            raise ValueError(f"resume: data.{key} is {now[key]!r} but the checkpoint's data "
                             f"position was taken with {state.get(key)!r}; the run would not "
                             f"continue the same data")
    return int(state["step"])
