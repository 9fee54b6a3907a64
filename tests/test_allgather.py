"""All-gather attention (LASP-2H's softmax layers) vs dense attention on the unsharded
sequence: block by block with documents as segments (no mask), and dK/dV reduce-scattered to
their owners (the ring form on gloo) at CP=2 and CP=4; outputs and every gradient."""

from __future__ import annotations

from typing import Any

import torch

from attention_reference import check_sharded_attention
from longtrain.parallel.spawn import run_distributed

# (name, B, T, Hq, Hkv, D, causal, docs, dtype)
CASES = [
    ("causal_gqa_docs_fp64", 2, 48, 4, 2, 16, True, True, torch.float64),
    ("causal_fp64", 1, 48, 2, 2, 8, True, False, torch.float64),
    ("causal_mqa_docs_fp32", 1, 64, 4, 1, 16, True, True, torch.float32),
]


def _world(runtime: Any) -> None:
    from longtrain.attention.base import AttentionContext, AttentionMeta, get_attention

    attn = get_attention("allgather")
    ctx = AttentionContext(cp_group=runtime.cp_group, cp_size=runtime.dims.cp,
                           cp_rank=runtime.cp_rank)

    def attend(q, k, v, causal, doc):
        return attn(q, k, v, AttentionMeta(causal=causal, doc_ids_bt=doc), ctx)

    check_sharded_attention(runtime, attend, CASES, label="allgather")


def test_allgather_cp2_matches_dense_reference() -> None:
    run_distributed(_world, world_size=2, cp=2)


def test_allgather_cp4_matches_dense_reference() -> None:
    run_distributed(_world, world_size=4, cp=4)


def _reduce_scatter_world(runtime: Any) -> None:
    from longtrain.attention.allgather import reduce_scatter_sequence
    from longtrain.attention.types import AttentionContext
    from longtrain.parallel.layout import split_for_cp

    cp, rank = runtime.dims.cp, runtime.cp_rank
    ctx = AttentionContext(cp_group=runtime.cp_group, cp_size=cp, cp_rank=rank)
    # rank r's gradient of the whole sequence: a known function of r, so the sum is known
    whole = torch.arange(2 * cp * 3 * 2, dtype=torch.float64).reshape(1, 2 * cp * 3, 2)
    got = reduce_scatter_sequence(whole * (rank + 1), ctx, what="test")
    expected = split_for_cp(whole * sum(range(1, cp + 1)), cp_size=cp, cp_rank=rank)
    assert torch.equal(got, expected), (rank, got, expected)


def test_reduce_scatter_sums_every_rank_and_keeps_the_owners_chunks() -> None:
    run_distributed(_reduce_scatter_world, world_size=4, cp=4)
