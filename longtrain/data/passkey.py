"""Passkey retrieval: a random 5-digit key is hidden at a random depth inside repetitive
filler; the sequence ends by asking for it and giving the answer, so predicting the answer's
digits needs retrieval across the whole context.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from longtrain.data.textgen import (EvalPrompt, TaskSample, filler_ids, filler_phase, margin,
                                    too_short)
from longtrain.data.tokenizer import ByteTokenizer, Tokenizer

NAME = "passkey"
_INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it. "
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


def _build(tokenizer: Tokenizer, *, total: int, key: str, depth: float, phase: int,
           answer: bool, what: str) -> tuple[list[int], int]:
    head = tokenizer.encode(_INTRO, bos=True)
    needle = tokenizer.encode(_NEEDLE.format(key=key))
    tail = tokenizer.encode(_QUESTION)
    answer_ids = tokenizer.encode(key + ".", eos=True) if answer else []
    # the same minimum for every sample: the key's length in tokens is bounded, not drawn
    worst = (len(head) + len(tokenizer.encode(_NEEDLE.format(key="00000"))) + len(tail)
             + (len(tokenizer.encode("00000.", eos=True)) if answer else 0)
             + (2 if answer else 1) * margin(tokenizer))
    extra = 1 if answer else 0
    filler_len = total - len(head) - len(needle) - len(tail) - len(answer_ids)
    if total < worst or filler_len < 0:
        raise too_short(NAME, needed=max(worst, total - filler_len) - extra, length=total - extra,
                        what=what)
    filler = filler_ids(tokenizer, filler_len, phase=phase)
    cut = int(depth * filler_len)
    ids = head + filler[:cut] + needle + filler[cut:] + tail
    return ids + answer_ids, len(ids)


def passkey_sample(*, seq_len: int, seed: int, index: int,
                   tokenizer: Tokenizer = ByteTokenizer()) -> PasskeySample:
    rng = random.Random(seed * 1_000_003 + index)
    key = f"{rng.randrange(10_000, 100_000)}"
    depth = rng.random()
    # Start the filler at a random phase so the needle is not always aligned to a sentence.
    phase = filler_phase(tokenizer, rng)
    ids, answer_start = _build(tokenizer, total=seq_len + 1, key=key, depth=depth, phase=phase,
                               answer=True, what="data.seq_len")
    return PasskeySample(ids=ids, key=key, answer_start=answer_start, depth=depth)


def sample(*, seq_len: int, seed: int, index: int, tokenizer: Tokenizer) -> TaskSample:
    s = passkey_sample(seq_len=seq_len, seed=seed, index=index, tokenizer=tokenizer)
    return TaskSample(ids=s.ids, answers=(s.key,), answer_starts=(s.answer_start,), depth=s.depth)


def prompt(*, length: int, depth: float, seed: int, index: int,
           tokenizer: Tokenizer) -> EvalPrompt:
    rng = random.Random(f"eval:{NAME}:{seed}:{length}:{depth}:{index}")
    key = f"{rng.randrange(10_000, 100_000)}"
    ids, _ = _build(tokenizer, total=length, key=key, depth=depth,
                    phase=filler_phase(tokenizer, rng), answer=False, what="length")
    return EvalPrompt(task=NAME, ids=ids, answer=key, length=length, depth=depth)
