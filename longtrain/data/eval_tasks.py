"""Evaluation counterparts of the synthetic tasks, shared with `longtrain-eval`.

`make_eval_prompts` builds prompts of an exact token length with the queried fact at a given
depth and a known answer; the model continues each prompt (greedy), and `score` compares the
decoded continuations with the answers. A (length x depth) grid of these is the needle /
passkey evaluation.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from longtrain.data.synthetic import TASKS
from longtrain.data.textgen import EvalPrompt
from longtrain.data.tokenizer import ByteTokenizer, Tokenizer

__all__ = ["EvalPrompt", "make_eval_prompts", "score", "answer_max_tokens"]


def make_eval_prompts(task: str, *, length: int, depth: float, n: int, seed: int = 0,
                      tokenizer: Optional[Tokenizer] = None) -> list[EvalPrompt]:
    """`n` prompts of exactly `length` token ids each, the answer's fact at fraction `depth`
    (0 = start of the context, 1 = end). Deterministic in (task, length, depth, n, seed) and
    disjoint from training samples (a separate random stream)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {sorted(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    tok = tokenizer or ByteTokenizer()
    return [TASKS[task].prompt(length=length, depth=depth, seed=seed, index=i, tokenizer=tok)
            for i in range(n)]


def answer_max_tokens(prompts: Sequence[EvalPrompt], tokenizer: Optional[Tokenizer] = None) -> int:
    """How many tokens to generate so every answer fits (plus a little slack)."""
    tok = tokenizer or ByteTokenizer()
    return max(len(tok.encode(p.answer)) for p in prompts) + 4


def _correct(prediction: str, answer: str) -> bool:
    # the answer as a whole word: "12345" does not match inside "123456"
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])", prediction) is not None


def score(task: str, predictions: Sequence[str], answers: Sequence[str]) -> dict:
    """Accuracy of decoded continuations: a prediction is correct when it contains the answer
    as a whole token (surrounding text is allowed). Returns accuracy, n and per-item flags."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {sorted(TASKS)}")
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    correct = [_correct(p, a) for p, a in zip(predictions, answers)]
    return {"task": task, "n": len(correct), "accuracy": sum(correct) / max(1, len(correct)),
            "correct": correct}
