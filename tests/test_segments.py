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
