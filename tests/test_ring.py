"""Ring attention vs dense attention on the unsharded sequence: outputs and dq/dk/dv.

Every rank builds the same global q/k/v (and document ids) from a seed, computes the
explicit-softmax reference with autograd, shards inputs and reference with the production
layout function, runs the ring on its shard, and asserts on its shard of out and grads.
"""

from __future__ import annotations

import pytest
import torch

from attention_reference import check_sharded_attention
from longtrain.parallel.spawn import run_distributed

# (name, B, T, Hq, Hkv, D, causal, docs, dtype)
CASES = [
    ("causal_gqa_fp64", 2, 48, 4, 2, 16, True, False, torch.float64),
    ("causal_mqa_docs_fp64", 1, 48, 4, 1, 16, True, True, torch.float64),
    ("noncausal_docs_fp64", 1, 48, 2, 2, 8, False, True, torch.float64),
    ("noncausal_fp32", 1, 40, 2, 1, 16, False, False, torch.float32),
    ("causal_docs_fp32", 2, 40, 4, 2, 16, True, True, torch.float32),
]


def _check_ring(runtime, cases) -> None:
    from longtrain.attention.ring import ring_attention_fn

    check_sharded_attention(
        runtime, lambda q, k, v, causal, doc: ring_attention_fn(
            q, k, v, group=runtime.cp_group, causal=causal, doc_bt=doc), cases, label="ring")


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_matches_dense_reference(cp):
    run_distributed(_check_ring, world_size=cp, cp=cp, args=(CASES,))
