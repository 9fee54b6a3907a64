"""Associative recall (multi-query, MQAR-style, in text): the context is a long list of
random "key: value" lines; the sequence then repeats some keys and the model must produce each
key's value. Every line is a candidate, so the whole context has to be indexed.
"""

from __future__ import annotations

import random
import string

from longtrain.data.textgen import (EvalPrompt, TaskSample, filler_ids, filler_phase, margin,
                                    too_short)
from longtrain.data.tokenizer import Tokenizer

NAME = "assoc_recall"
# queries per training sequence (an evaluation prompt asks one)
NUM_QUERIES = 4
_INTRO = "Remember the value of every key. "
_RECALL = "Recall.\n"


def _build(tokenizer: Tokenizer, rng: random.Random, *, total: int, depth: float,
           n_queries: int, answer: bool, what: str) -> tuple[list[int], list[int], list[str]]:
    """ids, answer start offsets and answer strings."""
    head = tokenizer.encode(_INTRO, bos=True)
    header = tokenizer.encode(_RECALL)
    eos = tokenizer.encode("", eos=True) if answer else []
    # Lines are encoded as "key: " + "value\n" so a query line has the same ids as its line
    # in the context; with the byte tokenizer every line has this length.
    line_len = (len(tokenizer.encode("abcd: ")) + len(tokenizer.encode("1234\n"))
                + margin(tokenizer))
    budget = total - len(head) - len(header) - len(eos)
    if budget < 2 * n_queries * line_len:
        extra = 1 if answer else 0
        raise too_short(NAME, needed=total - budget + 2 * n_queries * line_len - extra,
                        length=total - extra, what=what)
    # enough distinct keys for the number of lines that fit
    letters = 4
    while 26 ** letters < 8 * (budget // line_len + 1):
        letters += 1
    used: set[str] = set()
    lines: list[tuple[list[int], list[int], str]] = []
    used_len = longest = 0
    while True:
        key = "".join(rng.choice(string.ascii_lowercase) for _ in range(letters))
        if key in used:
            continue
        value = f"{rng.randrange(10_000):04d}"
        key_ids, value_ids = tokenizer.encode(f"{key}: "), tokenizer.encode(f"{value}\n")
        n = len(key_ids) + len(value_ids)
        # keep room for the query lines (each at most as long as the longest context line)
        if used_len + n + n_queries * max(longest, n) > budget:
            break
        used.add(key)
        lines.append((key_ids, value_ids, value))
        used_len += n
        longest = max(longest, n)
    if len(lines) < n_queries:
        extra = 1 if answer else 0
        raise too_short(NAME, needed=total + 2 * n_queries * max(longest, line_len) - extra,
                        length=total - extra, what=what)
    first = min(len(lines) - 1, int(depth * len(lines)))
    others = [i if i < first else i + 1 for i in rng.sample(range(len(lines) - 1), n_queries - 1)]
    queries: list[int] = []
    starts: list[int] = []
    answers: list[str] = []
    for q in [first, *others]:
        key_ids, value_ids, value = lines[q]
        queries += key_ids
        answers.append(value)
        if answer:
            starts.append(len(queries))
            queries += value_ids
    residual = budget - used_len - len(queries)
    body = [i for key_ids, value_ids, _ in lines for i in key_ids + value_ids]
    filler = filler_ids(tokenizer, residual, phase=filler_phase(tokenizer, rng))
    ids = head + filler + body + header + queries + eos
    base = len(ids) - len(eos) - len(queries)
    return ids, [base + s for s in starts], answers


def sample(*, seq_len: int, seed: int, index: int, tokenizer: Tokenizer) -> TaskSample:
    rng = random.Random(f"{NAME}:{seed}:{index}")
    depth = rng.random()
    ids, starts, answers = _build(tokenizer, rng, total=seq_len + 1, depth=depth,
                                  n_queries=NUM_QUERIES, answer=True, what="data.seq_len")
    return TaskSample(ids=ids, answers=tuple(answers), answer_starts=tuple(starts), depth=depth)


def prompt(*, length: int, depth: float, seed: int, index: int,
           tokenizer: Tokenizer) -> EvalPrompt:
    rng = random.Random(f"eval:{NAME}:{seed}:{length}:{depth}:{index}")
    ids, _, answers = _build(tokenizer, rng, total=length, depth=depth, n_queries=1,
                             answer=False, what="length")
    return EvalPrompt(task=NAME, ids=ids, answer=answers[0], length=length, depth=depth)
