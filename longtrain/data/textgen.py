"""Shared pieces of the synthetic long-context tasks: filler, placing inserts at a depth, and
the sample / prompt records every task returns.

A task builds token ids by concatenating separately encoded pieces, so a sample has exactly
the requested number of tokens under any tokenizer (filler is the tiled ids of one filler
sentence block, cut to length).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from longtrain.data.tokenizer import ByteTokenizer, Tokenizer

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


@dataclass(frozen=True)
class TaskSample:
    """A training sequence of exactly `seq_len + 1` token ids (inputs [:-1], targets [1:])."""

    ids: list[int]
    # the answer strings, and the index in `ids` of each answer's first token
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]
    # where the (first) queried fact sits, as a fraction of the context
    depth: float


@dataclass(frozen=True)
class EvalPrompt:
    """An evaluation prompt of exactly `length` token ids that ends where the model must
    produce `answer`."""

    task: str
    ids: list[int]
    answer: str
    length: int
    depth: float


@functools.lru_cache(maxsize=16)
def _filler_unit(tokenizer: Tokenizer) -> tuple[int, ...]:
    return tuple(tokenizer.encode(FILLER))


def filler_ids(tokenizer: Tokenizer, n: int, *, phase: int) -> list[int]:
    """`n` filler token ids starting `phase` tokens into the repeating block."""
    unit = _filler_unit(tokenizer)
    phase %= len(unit)
    reps = (phase + n) // len(unit) + 1
    return list(unit * reps)[phase:phase + n]


def filler_phase(tokenizer: Tokenizer, rng: random.Random) -> int:
    return rng.randrange(len(_filler_unit(tokenizer)))


def place(filler: list[int], inserts: list[tuple[float, list[int]]]) -> tuple[list[int], list[int]]:
    """Insert each (depth, ids) into `filler` at fraction `depth` of it (stable for equal
    depths). Returns the ids and the start offset of every insert, in the given order."""
    order = sorted(range(len(inserts)), key=lambda k: inserts[k][0])
    out: list[int] = []
    starts = [0] * len(inserts)
    prev = 0
    for k in order:
        depth, ids = inserts[k]
        cut = min(len(filler), max(prev, int(depth * len(filler))))
        out += filler[prev:cut]
        starts[k] = len(out)
        out += ids
        prev = cut
    out += filler[prev:]
    return out, starts


def margin(tokenizer: Tokenizer) -> int:
    """Tokens to allow beyond a placeholder for each randomly drawn piece (a key, a number):
    none for the byte tokenizer, whose lengths are the text's; a few for subword tokenizers,
    whose token counts vary with the digits drawn. Keeps a task's minimum length one number,
    the same for every sample."""
    return 0 if isinstance(tokenizer, ByteTokenizer) else 3


def too_short(task: str, *, needed: int, length: int, what: str = "data.seq_len") -> ValueError:
    return ValueError(f"{what}={length} is too short for the {task} task "
                      f"(needs {what} >= {needed})")
