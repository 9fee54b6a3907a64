"""Synthetic long-context tasks, generated from (seed, index) so any sample can be rebuilt
anywhere (every rank, after a restart) without storing data.

passkey: a random 5-digit key is hidden at a random depth inside repetitive filler; the
sequence ends by asking for it and giving the answer, so predicting the answer's digits needs
retrieval across the whole context.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from longtrain.data.tokenizer import ByteTokenizer

_INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it. "
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
_QUESTION = "What is the pass key? The pass key is "


@dataclass(frozen=True)
class PasskeySample:
    """One sequence of exactly `seq_len + 1` token ids (inputs are [:-1], targets [1:])."""

    ids: list[int]
    key: str
    # index in `ids` of the first answer digit, and the fraction of the filler before the needle
    answer_start: int
    depth: float


def passkey_sample(*, seq_len: int, seed: int, index: int,
                   tokenizer: ByteTokenizer = ByteTokenizer()) -> PasskeySample:
    rng = random.Random(seed * 1_000_003 + index)
    key = f"{rng.randrange(10_000, 100_000)}"
    depth = rng.random()
    head = tokenizer.encode(_INTRO, bos=True)
    needle = tokenizer.encode(_NEEDLE.format(key=key))
    tail = tokenizer.encode(_QUESTION) + tokenizer.encode(key + ".", eos=True)
    filler_len = seq_len + 1 - len(head) - len(needle) - len(tail)
    if filler_len < 0:
        raise ValueError(f"data.seq_len={seq_len} is too short for the passkey task "
                         f"(needs data.seq_len >= {seq_len - filler_len})")
    filler_text = _FILLER * (filler_len // len(_FILLER) + 1)
    # Start the filler at a random phase so the needle is not always aligned to a sentence.
    phase = rng.randrange(len(_FILLER))
    filler = tokenizer.encode((filler_text + _FILLER)[phase:phase + filler_len])
    cut = int(depth * filler_len)
    ids = head + filler[:cut] + needle + filler[cut:] + tail
    answer_start = len(ids) - len(key) - 2
    return PasskeySample(ids=ids, key=key, answer_start=answer_start, depth=depth)


def passkey_tokens(*, seq_len: int, seed: int, indices: list[int]) -> torch.Tensor:
    """[len(indices), seq_len + 1] int64 token ids."""
    rows = [passkey_sample(seq_len=seq_len, seed=seed, index=i).ids for i in indices]
    return torch.tensor(rows, dtype=torch.long)


def packed_passkey_tokens(*, seq_len: int, seed: int, indices: list[int], docs_per_seq: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Several passkey documents packed into each sequence.

    Returns ids and document ids, both [len(indices), seq_len + 1] int64; document j of
    sample i is passkey sample `i * docs_per_seq + j` of its own (shorter) length.
    """
    total = seq_len + 1
    lengths = [total // docs_per_seq] * docs_per_seq
    lengths[-1] += total - sum(lengths)
    ids_rows, doc_rows = [], []
    for i in indices:
        ids: list[int] = []
        docs: list[int] = []
        for j, length in enumerate(lengths):
            sample = passkey_sample(seq_len=length - 1, seed=seed, index=i * docs_per_seq + j)
            ids += sample.ids
            docs += [j] * length
        ids_rows.append(ids)
        doc_rows.append(docs)
    return torch.tensor(ids_rows, dtype=torch.long), torch.tensor(doc_rows, dtype=torch.long)
