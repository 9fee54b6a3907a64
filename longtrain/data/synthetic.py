"""Synthetic long-context tasks as a data source, generated from (seed, index) so any sample
can be rebuilt anywhere (every rank, after a restart) without storing data.

Tasks (one module each): passkey (`passkey.py`), multikey_needle (`needle.py`),
assoc_recall (`recall.py`). Each has `sample(seq_len, seed, index, tokenizer)` for training and
`prompt(length, depth, seed, index, tokenizer)` for evaluation (see `eval_tasks.py`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from longtrain.data import needle, passkey, recall
from longtrain.data.passkey import PasskeySample, passkey_sample
from longtrain.data.textgen import TaskSample
from longtrain.data.tokenizer import ByteTokenizer, Tokenizer

__all__ = ["TASKS", "PasskeySample", "TaskSample", "passkey_sample", "passkey_tokens",
           "packed_passkey_tokens", "task_sample", "task_tokens", "packed_task_tokens",
           "task_answer_mask", "task_problems"]

TASKS: dict[str, ModuleType] = {m.NAME: m for m in (passkey, needle, recall)}


def _task(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"data.task={name!r} is not one of {sorted(TASKS)}")
    return TASKS[name]


def task_sample(task: str, *, seq_len: int, seed: int, index: int,
                tokenizer: Optional[Tokenizer] = None) -> TaskSample:
    return _task(task).sample(seq_len=seq_len, seed=seed, index=index,
                              tokenizer=tokenizer or ByteTokenizer())


def task_tokens(task: str, *, seq_len: int, seed: int, indices: list[int],
                tokenizer: Optional[Tokenizer] = None) -> torch.Tensor:
    """[len(indices), seq_len + 1] int64 token ids."""
    rows = [task_sample(task, seq_len=seq_len, seed=seed, index=i, tokenizer=tokenizer).ids
            for i in indices]
    return torch.tensor(rows, dtype=torch.long)


def _doc_lengths(seq_len: int, docs_per_seq: int) -> list[int]:
    total = seq_len + 1
    lengths = [total // docs_per_seq] * docs_per_seq
    lengths[-1] += total - sum(lengths)
    return lengths


def packed_task_tokens(task: str, *, seq_len: int, seed: int, indices: list[int],
                       docs_per_seq: int, tokenizer: Optional[Tokenizer] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Several task documents packed into each sequence.

    Returns ids and document ids, both [len(indices), seq_len + 1] int64; document j of
    sample i is sample `i * docs_per_seq + j` of its own (shorter) length.
    """
    lengths = _doc_lengths(seq_len, docs_per_seq)
    ids_rows, doc_rows = [], []
    for i in indices:
        ids: list[int] = []
        docs: list[int] = []
        for j, length in enumerate(lengths):
            s = task_sample(task, seq_len=length - 1, seed=seed, index=i * docs_per_seq + j,
                            tokenizer=tokenizer)
            ids += s.ids
            docs += [j] * length
        ids_rows.append(ids)
        doc_rows.append(docs)
    return torch.tensor(ids_rows, dtype=torch.long), torch.tensor(doc_rows, dtype=torch.long)


def task_answer_mask(task: str, *, seq_len: int, seed: int, indices: list[int],
                     docs_per_seq: int = 1, tokenizer: Optional[Tokenizer] = None) -> torch.Tensor:
    """[len(indices), seq_len + 1] bool: True at the answer tokens of the sequences that
    `task_tokens` / `packed_task_tokens` build for the same arguments."""
    tokenizer = tokenizer or ByteTokenizer()
    lengths = _doc_lengths(seq_len, docs_per_seq)
    mask = torch.zeros(len(indices), seq_len + 1, dtype=torch.bool)
    for row, i in enumerate(indices):
        offset = 0
        for j, length in enumerate(lengths):
            s = task_sample(task, seq_len=length - 1, seed=seed, index=i * docs_per_seq + j,
                            tokenizer=tokenizer)
            for answer, start in zip(s.answers, s.answer_starts):
                n = len(tokenizer.encode(answer))
                mask[row, offset + start:offset + start + n] = True
            offset += length
    return mask


def passkey_tokens(*, seq_len: int, seed: int, indices: list[int]) -> torch.Tensor:
    """[len(indices), seq_len + 1] int64 token ids of the passkey task (byte tokens)."""
    return task_tokens("passkey", seq_len=seq_len, seed=seed, indices=indices)


def packed_passkey_tokens(*, seq_len: int, seed: int, indices: list[int], docs_per_seq: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    return packed_task_tokens("passkey", seq_len=seq_len, seed=seed, indices=indices,
                              docs_per_seq=docs_per_seq)


def task_problems(task: str, *, seq_len: int, docs_per_seq: int, seed: int,
                  tokenizer: Optional[Tokenizer] = None) -> list[str]:
    """Whether every document of `task` fits: its intro, needles and question have a fixed
    length. Found here, not at step 0."""
    if task not in TASKS:
        return [f"data.task={task!r} is not one of {sorted(TASKS)} for data.source='synthetic'"]
    if docs_per_seq < 1:
        return [f"data.docs_per_seq={docs_per_seq} must be >= 1"]
    doc_len = min(_doc_lengths(seq_len, docs_per_seq)) - 1
    try:
        task_sample(task, seq_len=doc_len, seed=seed, index=0, tokenizer=tokenizer)
    except ValueError as exc:
        if docs_per_seq == 1:
            return [str(exc)]
        return [f"data.seq_len={seq_len} / data.docs_per_seq={docs_per_seq} leaves documents "
                f"of {doc_len} tokens, too short for the {task} task ({exc})"]
    return []
