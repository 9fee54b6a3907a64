"""Load balance of zigzag context parallelism on packed documents: the causal attention work
of each CP rank (same-document query/key pairs) when sequences are packed from documents of a
long-tailed length distribution; prints a table and writes a section of BENCHMARKS.md.

    python -m benchmarks.cp_balance --out BENCHMARKS.md

Zigzag gives every rank the same causal work for one document filling the sequence. With
packed documents a rank's work depends on where the long documents fall.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from benchmarks.report import (add_output_args, argument_parser, command_line, join_section,
                               replace_section)
from longtrain.parallel.layout import rank_attention_work

LENGTHS = (131072, 524288)
CPS = (2, 4, 8, 16)
SEQUENCES = 50
# document lengths: log-normal, median e^7.5 ~ 1.8K tokens, sigma 1.2 (a long tail: about
# 1 document in 200 is over 30K tokens), the last one cut to fill the sequence
MU, SIGMA = 7.5, 1.2
TITLE = "Context-parallel load balance on packed documents (zigzag)"
METHOD = f"""\
- {SEQUENCES} sequences per length, each packed from log-normal document lengths (median
  e^{MU} ~ {math.exp(MU):,.0f} tokens, sigma {SIGMA}), the last document cut at the end; seeded.
- Work of a rank: the causal same-document (query, key) pairs of its two zigzag chunks
  (`longtrain.parallel.layout.rank_attention_work`); imbalance = max / mean over the ranks,
  which is the attention time the slowest rank adds (the others wait for it).
- *Documents reordered*: `reordered`, a greedy placement of whole documents (longest first)
  at the front or the back of the sequence, keeping each document whole.
"""


def sample_lengths(total: int, gen: torch.Generator) -> list[int]:
    out, filled = [], 0
    while filled < total:
        n = int(math.exp(float(torch.randn(1, generator=gen)) * SIGMA + MU)) + 1
        n = min(n, total - filled)
        out.append(n)
        filled += n
    return out


def ratio(lengths: list[int], cp: int) -> float:
    work = rank_attention_work(lengths, cp_size=cp)
    return max(work) / (sum(work) / cp)


def reordered(lengths: list[int], cp: int) -> list[int]:
    """Whole documents moved (longest first) to the front or the back of the sequence,
    whichever leaves the smaller imbalance with the unplaced tokens as one document between:
    the layout a data loader could choose without splitting documents."""
    total = sum(lengths)
    front: list[int] = []
    back: list[int] = []
    for n in sorted(lengths, reverse=True):
        rest = total - sum(front) - sum(back) - n
        as_front = front + [n] + ([rest] if rest else []) + back
        as_back = front + ([rest] if rest else []) + [n] + back
        if ratio(as_front, cp) <= ratio(as_back, cp):
            front.append(n)
        else:
            back.insert(0, n)
    return front + back


def imbalance(length: int, cp: int, *, sequences: int = SEQUENCES, seed: int = 0
              ) -> tuple[list[float], list[float]]:
    """(zigzag's max / mean per sequence, the same after `reordered`)."""
    gen = torch.Generator().manual_seed(seed)
    plain, moved = [], []
    for _ in range(sequences):
        lengths = sample_lengths(length, gen)
        plain.append(ratio(lengths, cp))
        moved.append(ratio(reordered(lengths, cp), cp))
    return plain, moved


def main(argv: Optional[list[str]] = None) -> dict:
    p = argument_parser(__doc__, METHOD)
    add_output_args(p)
    args = p.parse_args(argv)
    head = ["T", "layout", *(f"CP={c}: mean / p90 / worst" for c in CPS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    got: dict = {}
    for length in LENGTHS:
        cells = {"zigzag": [f"{length // 1024}K", "zigzag"],
                 "reordered": [f"{length // 1024}K", "zigzag, documents reordered"]}
        for cp in CPS:
            for name, vals in zip(cells, map(torch.tensor, imbalance(length, cp))):
                got[(name, length, cp)] = float(vals.mean())
                cells[name].append(f"{vals.mean():.2f} / {vals.quantile(0.9):.2f} / "
                                   f"{vals.max():.2f}")
        lines += ["| " + " | ".join(c) + " |" for c in cells.values()]
    text = "\n".join(lines)
    print(text)
    worst = max(v for k, v in got.items() if k[0] == "zigzag")
    gain = max(got[("zigzag", n, c)] / got[("reordered", n, c)] for n in LENGTHS for c in CPS)
    verdict = [f"mean imbalance up to {worst:.2f}x (max / mean attention work per rank): "
               f"{'above' if worst > 1.05 else 'within'} the 5% that would justify a "
               f"document-aware layout",
               f"reordering whole documents gains at most {gain:.2f}x: the imbalance comes "
               f"from long documents inside the chunks, so a layout must split documents "
               f"(zigzag per document, as Megatron's THD format does) to remove it"]
    if args.out:
        body = join_section([f"`{command_line('benchmarks.cp_balance', argv)}`.", text],
                            verdict, METHOD)
        replace_section(args.out, "cp_balance", TITLE, body)
    return got


if __name__ == "__main__":
    main()
