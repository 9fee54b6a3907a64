"""Scoring with one forward pass per sequence, on any TP x CP layout.

Legend: B batch (1 here), N full sequence length (prompt + answer, or a perplexity sequence
plus its next token), T = N - 1 model inputs padded to a multiple of 2 * cp, T_local this CP
rank's zigzag shard of them, V/tp this TP rank's vocabulary shard, S scored targets.

A prompt is correct iff greedy decoding reproduces its answer. Greedy decoding feeds the
model its own argmax, so when every answer token is the argmax given the true prefix the
decoded tokens *are* the answer, and at the first mismatch they are not: scoring the argmax
at every answer position of one teacher-forced forward (prompt + answer) is exactly that
test, with no generation loop and no KV cache.

Inputs are padded at the end; causal attention keeps earlier positions from seeing the
padding, and padded targets are ignored.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from longtrain.data.loader import IGNORE_INDEX, MicroBatch, shard_sequences
from longtrain.parallel.layout import split_for_cp

# (this rank's shard: tokens, positions, document ids [B, T_local]; the global unpadded input
# length T - padding, which dynamic RoPE scaling reads) -> logits [B, T_local, V/tp]
Forward = Callable[[MicroBatch, int], torch.Tensor]
# (logits [B, T_local, V/tp], labels [B, T_local] with IGNORE_INDEX) -> float32 scalar sum of NLL
LossSum = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def padded_length(n: int, *, cp_size: int) -> int:
    """`n` rounded up to a multiple of 2 * cp_size (the zigzag layout's chunk count)."""
    multiple = 2 * cp_size if cp_size > 1 else 1
    return -(-n // multiple) * multiple


def layout_sequence(seq_bn: torch.Tensor, *, scored_from: int, pad_id: int, cp_size: int,
                    cp_rank: int, doc_bn: Optional[torch.Tensor] = None) -> MicroBatch:
    """This CP rank's shard of `seq_bn` ([B, N] int64 ids) as inputs [:-1] and targets [1:],
    padded at the end to a multiple of 2 * cp_size.

    Only targets with index >= `scored_from` (target j is seq[j + 1]) keep their label; the
    others, the padding and (with `doc_bn`) document boundaries are IGNORE_INDEX.
    """
    b, n = seq_bn.shape
    t = padded_length(n - 1, cp_size=cp_size)
    pad = t + 1 - n
    seq = torch.cat([seq_bn, seq_bn.new_full((b, pad), pad_id)], dim=1)
    docs = None
    if doc_bn is not None:
        # the padding is a document of its own after the last one
        docs = torch.cat([doc_bn, (doc_bn[:, -1:] + 1).expand(b, pad)], dim=1)
    mb = shard_sequences(seq, cp_size=cp_size, cp_rank=cp_rank, doc_bt1=docs)
    target = torch.arange(t)
    scored_t = ((target >= scored_from) & (target < n - 1)).expand(b, t)
    scored = split_for_cp(scored_t, cp_size=cp_size, cp_rank=cp_rank, dim=1)
    mb.labels_bt[~scored] = IGNORE_INDEX
    return mb


def vocab_parallel_argmax(logits_sv: torch.Tensor, *, vocab_start: int, tp_group=None
                          ) -> torch.Tensor:
    """Global argmax ids [S] int64 of vocabulary-sharded logits [S, V/tp] (every TP rank calls
    it with the same S; ties go to the lowest id, as torch.argmax on the full row)."""
    values_s, ids_s = logits_sv.float().max(dim=-1)
    ids_s = ids_s + vocab_start
    tp = _size(tp_group)
    if tp == 1 or logits_sv.shape[0] == 0:
        return ids_s
    all_values = [torch.empty_like(values_s) for _ in range(tp)]
    all_ids = [torch.empty_like(ids_s) for _ in range(tp)]
    dist.all_gather(all_values, values_s, group=tp_group)
    dist.all_gather(all_ids, ids_s, group=tp_group)
    # TP ranks hold increasing id ranges: the first rank with the maximum has the lowest id
    best_s = torch.stack(all_values).argmax(dim=0)
    return torch.stack(all_ids).gather(0, best_s[None]).squeeze(0)


def predict_answer(forward: Forward, prompt_ids: list[int], answer_ids: list[int], *,
                   pad_id: int, cp_size: int = 1, cp_rank: int = 0, cp_group=None,
                   tp_rank: int = 0, tp_group=None, device: torch.device = torch.device("cpu")
                   ) -> list[int]:
    """The model's argmax at each of the answer's positions given the true prefix (one
    forward over prompt + answer); identical on every rank of the TP x CP group.

    The prompt is correct iff the result equals `answer_ids` (see the module docstring).
    """
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)], dtype=torch.long)
    first = len(prompt_ids) - 1
    mb = layout_sequence(ids, scored_from=first, pad_id=pad_id, cp_size=cp_size,
                         cp_rank=cp_rank).to(device)
    logits_btv = forward(mb, ids.shape[1] - 1)
    scored_bt = mb.labels_bt != IGNORE_INDEX
    local_s = vocab_parallel_argmax(logits_btv[scored_bt], tp_group=tp_group,
                                    vocab_start=tp_rank * logits_btv.shape[-1])
    # each answer slot lies on exactly one CP rank: a sum over the CP group gathers them
    pred_a = torch.zeros(len(answer_ids), dtype=torch.long, device=local_s.device)
    pred_a[mb.positions_bt[scored_bt] - first] = local_s
    if _size(cp_group) > 1:
        dist.all_reduce(pred_a, group=cp_group)
    return [int(i) for i in pred_a.tolist()]


def sequence_nll(forward: Forward, loss_sum: LossSum, seq_bn: torch.Tensor, *, pad_id: int,
                 doc_bn: Optional[torch.Tensor] = None, cp_size: int = 1, cp_rank: int = 0,
                 device: torch.device = torch.device("cpu")) -> tuple[float, int]:
    """(sum of token NLL, number of targets) of this CP rank's shard of `seq_bn` ([B, N]:
    N - 1 inputs, every next token a target except across documents). The caller sums both
    over the CP (and DP) group."""
    mb = layout_sequence(seq_bn, scored_from=0, pad_id=pad_id, cp_size=cp_size,
                         cp_rank=cp_rank, doc_bn=doc_bn).to(device)
    logits_btv = forward(mb, seq_bn.shape[1] - 1)
    return float(loss_sum(logits_btv, mb.labels_bt)), mb.num_targets
