"""Documents as segments: the (query, key) runs each document holds in a block."""

from __future__ import annotations

import pytest
import torch

from longtrain.attention.segments import runs, segment_pairs


def test_runs_and_the_pairs_two_blocks_share():
    q = torch.tensor([0, 0, 1, 1, 1, 2])
    k = torch.tensor([1, 1, 2, 2, 3, 3, 3])
    assert runs(q) == [(0, 0, 2), (1, 2, 3), (2, 5, 1)]
    # document 0 has no key here (its rows keep lse -inf); 3 has no query
    assert segment_pairs(q, k) == [(slice(2, 5), slice(0, 2)), (slice(5, 6), slice(2, 4))]


def test_a_document_in_two_runs_is_refused_naming_it():
    with pytest.raises(ValueError, match="document id 1 forms more than one run"):
        segment_pairs(torch.tensor([1, 1, 2, 1]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="document id 0 forms more than one run of the key"):
        segment_pairs(torch.tensor([0]), torch.tensor([0, 1, 0]))


def test_rank_attention_work_counts_same_document_causal_pairs():
    """Against a brute force over every (query, key) pair of each rank's zigzag shard; one
    document filling the sequence is balanced exactly, packed ones are not."""
    from longtrain.parallel.layout import rank_attention_work, split_for_cp

    lengths, cp = [5, 17, 2, 40], 2
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    pos = torch.arange(doc.numel())
    for rank, got in enumerate(rank_attention_work(lengths, cp_size=cp)):
        q_doc, q_pos = (split_for_cp(x[None], cp_size=cp, cp_rank=rank)[0] for x in (doc, pos))
        brute = ((doc[None, :] == q_doc[:, None]) & (pos[None, :] <= q_pos[:, None])).sum()
        assert got == float(brute)
    one = rank_attention_work([64], cp_size=4)
    assert max(one) == min(one)
    assert max(rank_attention_work(lengths, cp_size=cp)) > 1.05 * min(
        rank_attention_work(lengths, cp_size=cp))
    with pytest.raises(ValueError, match="2 \\* cp = 4"):
        rank_attention_work([5, 6], cp_size=2)
