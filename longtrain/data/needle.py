"""Multi-key needle in a haystack (RULER's multikey NIAH): several needles "One of the special
magic numbers for <key> is: <number>." at random depths in filler; the sequence asks for one
key's number, so the model must retrieve the right needle among distractors.
"""

from __future__ import annotations

import functools
import random

from longtrain.data.textgen import (EvalPrompt, TaskSample, filler_ids, filler_phase, margin,
                                    place, too_short)
from longtrain.data.tokenizer import Tokenizer

NAME = "multikey_needle"
NUM_NEEDLES = 4
_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to "
          "memorize them. I will quiz you about the numbers afterwards. ")
_NEEDLE = "One of the special magic numbers for {key} is: {value}. "
_QUESTION = "What is the special magic number for {key}? The special magic number for {key} is "
_ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy",
               "jolly", "kind", "lucky", "misty", "noble", "odd", "proud", "quiet", "rapid",
               "silent", "tidy", "upper", "vivid", "wild", "young")
_NOUNS = ("apple", "bridge", "candle", "dragon", "engine", "forest", "garden", "harbor",
          "island", "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pepper",
          "quarry", "river", "saddle", "tunnel", "umbrella", "valley", "window", "zebra")


def _keys_values(rng: random.Random) -> tuple[list[str], list[str]]:
    pairs = rng.sample(range(len(_ADJECTIVES) * len(_NOUNS)), NUM_NEEDLES)
    keys = [f"{_ADJECTIVES[p // len(_NOUNS)]}-{_NOUNS[p % len(_NOUNS)]}" for p in pairs]
    values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in keys]
    return keys, values


@functools.lru_cache(maxsize=16)
def _worst_fixed(tokenizer: Tokenizer, *, answer: bool) -> int:
    """Tokens besides filler with the longest keys (all of them enumerated): the task's
    minimum length, the same for every sample."""
    keys = [f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS]
    value = "0" * 7
    needle = max(len(tokenizer.encode(_NEEDLE.format(key=k, value=value))) for k in keys)
    question = max(len(tokenizer.encode(_QUESTION.format(key=k))) for k in keys)
    answer_len = len(tokenizer.encode(value + ".", eos=True)) if answer else 0
    variable = NUM_NEEDLES + (1 if answer else 0)
    return (len(tokenizer.encode(_INTRO, bos=True)) + NUM_NEEDLES * needle + question
            + answer_len + variable * margin(tokenizer))


def _build(tokenizer: Tokenizer, rng: random.Random, *, total: int, depth: float, answer: bool,
           what: str) -> tuple[list[int], int, str]:
    keys, values = _keys_values(rng)
    target = rng.randrange(NUM_NEEDLES)
    depths = [depth if k == target else rng.random() for k in range(NUM_NEEDLES)]
    phase = filler_phase(tokenizer, rng)
    head = tokenizer.encode(_INTRO, bos=True)
    needles = [tokenizer.encode(_NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values)]
    tail = tokenizer.encode(_QUESTION.format(key=keys[target]))
    answer_ids = tokenizer.encode(values[target] + ".", eos=True) if answer else []
    fixed = len(head) + sum(map(len, needles)) + len(tail) + len(answer_ids)
    filler_len = total - fixed
    worst = _worst_fixed(tokenizer, answer=answer)
    if total < worst or filler_len < 0:
        extra = 1 if answer else 0
        raise too_short(NAME, needed=max(worst, fixed) - extra, length=total - extra, what=what)
    body, _ = place(filler_ids(tokenizer, filler_len, phase=phase), list(zip(depths, needles)))
    ids = head + body + tail
    return ids + answer_ids, len(ids), values[target]


def sample(*, seq_len: int, seed: int, index: int, tokenizer: Tokenizer) -> TaskSample:
    rng = random.Random(f"{NAME}:{seed}:{index}")
    depth = rng.random()
    ids, start, value = _build(tokenizer, rng, total=seq_len + 1, depth=depth, answer=True,
                               what="data.seq_len")
    return TaskSample(ids=ids, answers=(value,), answer_starts=(start,), depth=depth)


def prompt(*, length: int, depth: float, seed: int, index: int,
           tokenizer: Tokenizer) -> EvalPrompt:
    rng = random.Random(f"eval:{NAME}:{seed}:{length}:{depth}:{index}")
    ids, _, value = _build(tokenizer, rng, total=length, depth=depth, answer=False, what="length")
    return EvalPrompt(task=NAME, ids=ids, answer=value, length=length, depth=depth)
