"""Documents as segments, not masks: packed sequences attend within each document by slicing
the document's run of tokens, so no `[T, T]` (or `[Tq, Tk]`) mask or score tensor exists.

Document ids are contiguous runs along the sequence (packing writes them so; a zigzag shard
of two chunks keeps each document one run too: a document present in both chunks covers
everything between them). `segment_pairs` finds, for a block of query rows and key columns,
the (query range, key range) of every document both hold.
"""

from __future__ import annotations

import torch


def runs(doc_t: torch.Tensor) -> list[tuple[int, int, int]]:
    """(document id, start, length) of each run of equal ids in a 1-D tensor."""
    ids, counts = torch.unique_consecutive(doc_t, return_counts=True)
    out, start = [], 0
    for doc, n in zip(ids.tolist(), counts.tolist()):
        out.append((doc, start, n))
        start += n
    return out


def segment_pairs(q_doc_t: torch.Tensor, k_doc_t: torch.Tensor
                  ) -> list[tuple[slice, slice]]:
    """(query slice, key slice) per document present in both rows of ids, in query order.

    Raises ValueError when a document id forms more than one run (documents must be
    contiguous: see the module docstring)."""
    q_runs, k_runs = runs(q_doc_t), runs(k_doc_t)
    k_by_id = {}
    for doc, start, n in k_runs:
        if doc in k_by_id:
            raise ValueError(f"document id {doc} forms more than one run of the key tokens: "
                             f"documents must be contiguous")
        k_by_id[doc] = slice(start, start + n)
    seen = set()
    out = []
    for doc, start, n in q_runs:
        if doc in seen:
            raise ValueError(f"document id {doc} forms more than one run of the query tokens: "
                             f"documents must be contiguous")
        seen.add(doc)
        if doc in k_by_id:
            out.append((slice(start, start + n), k_by_id[doc]))
    return out


__all__ = ["runs", "segment_pairs"]
