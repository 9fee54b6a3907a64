"""Ulysses and ulysses x ring attention vs dense attention on the unsharded sequence.

Every rank builds the same global q/k/v (and document ids) from a seed, computes the
explicit-softmax reference with autograd, shards inputs and reference with the production
layout function, runs the backend (through the registry) on its shard, and asserts on its
shard of out and dq/dk/dv. One world of 2 (ulysses) and one of 4 (ulysses over all 4 and
ulysses 2 x ring 2 on megatron's hierarchical CP groups) cover everything; DeepSpeed's comm
initialization costs seconds per process, so each world runs all its cases.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from attention_reference import check_sharded_attention
from longtrain.parallel.layout import split_for_cp, zigzag_chunk_ids
from longtrain.parallel.spawn import run_distributed

# (name, B, T, Hq, Hkv, D, causal, docs, dtype)
ULYSSES_CP2 = [
    ("causal_gqa_fp64", 2, 48, 4, 2, 16, True, False, torch.float64),
    ("causal_gqa_docs_fp64", 1, 48, 4, 2, 16, True, True, torch.float64),
    ("noncausal_docs_fp64", 1, 48, 2, 2, 8, False, True, torch.float64),
    ("noncausal_gqa_fp32", 1, 40, 4, 2, 16, False, False, torch.float32),
    ("causal_docs_fp32", 2, 40, 4, 2, 16, True, True, torch.float32),
    # MQA: the one K/V head is replicated to both ranks
    ("causal_mqa_replicated_docs_fp64", 1, 48, 4, 1, 16, True, True, torch.float64),
]
# all-to-all over 4 ranks: Hkv below 4 is replicated up to 4
ULYSSES_CP4 = [
    ("causal_gqa_docs_fp64", 1, 48, 8, 4, 8, True, True, torch.float64),
    ("noncausal_gqa_fp64", 2, 48, 8, 4, 8, False, False, torch.float64),
    ("causal_fp32", 1, 48, 4, 4, 16, True, False, torch.float32),
    ("causal_gqa_replicated_docs_fp64", 1, 48, 8, 2, 8, True, True, torch.float64),
    ("noncausal_mqa_replicated_fp64", 2, 48, 4, 1, 8, False, False, torch.float64),
]
# ulysses 2 x ring 2; the ring step inside sees Hq/2 and Hkv/2 heads (MQA inside: 2 / 1;
# one K/V head is replicated to 2 first)
ULYSSES_RING_2X2 = [
    ("causal_gqa_fp64", 2, 48, 4, 2, 16, True, False, torch.float64),
    ("causal_gqa_docs_fp64", 1, 48, 4, 2, 16, True, True, torch.float64),
    ("noncausal_docs_fp64", 1, 48, 2, 2, 8, False, True, torch.float64),
    ("causal_docs_fp32", 2, 48, 4, 2, 16, True, True, torch.float32),
    ("causal_mqa_replicated_docs_fp64", 1, 48, 4, 1, 16, True, True, torch.float64),
]


def _check_cases(runtime: Any, backend: str, cases: list, *, ulysses_group=None,
                 ring_group=None) -> None:
    from longtrain.attention.base import AttentionContext, AttentionMeta, get_attention

    attn = get_attention(backend)
    cp, r = runtime.dims.cp, runtime.cp_rank
    ctx = AttentionContext(cp_group=runtime.cp_group, cp_size=cp, cp_rank=r,
                           ulysses_group=ulysses_group, ring_group=ring_group)

    def attend(q, k, v, causal, doc):
        return attn(q, k, v, AttentionMeta(causal=causal, doc_ids_bt=doc), ctx)

    check_sharded_attention(runtime, attend, cases, label=backend)


def _expect_head_error(runtime: Any, backend: str, hq: int, hkv: int, fragments: list[str], *,
                       ulysses_group=None, ring_group=None) -> None:
    """Every rank raises the same ValueError before any communication (so nothing hangs)."""
    from longtrain.attention.base import AttentionContext, AttentionMeta, get_attention

    ctx = AttentionContext(cp_group=runtime.cp_group, cp_size=runtime.dims.cp,
                           cp_rank=runtime.cp_rank, ulysses_group=ulysses_group,
                           ring_group=ring_group)
    t = 4 * runtime.dims.cp
    q = torch.randn(1, t, hq, 8)
    kv = torch.randn(1, t, hkv, 8)
    with pytest.raises(ValueError) as info:
        get_attention(backend)(q, kv, kv, AttentionMeta(), ctx)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def _world2(runtime: Any) -> None:
    _check_cases(runtime, "ulysses", ULYSSES_CP2)
    # 3 query heads cannot be shared equally by 2 ranks (K/V heads would be replicated)
    _expect_head_error(runtime, "ulysses", 3, 1,
                       ["model.num_heads=3", "parallel.tp=1", "ulysses degree 2"])


def _world4(runtime: Any) -> None:
    import torch.distributed as dist

    # megatron's hierarchical CP groups: level 0 consecutive, level 1 strided
    r = runtime.cp_rank
    assert dist.get_process_group_ranks(runtime.ulysses_group) == [r - r % 2, r - r % 2 + 1]
    assert dist.get_process_group_ranks(runtime.ring_group) == [r % 2, r % 2 + 2]
    _check_cases(runtime, "ulysses", ULYSSES_CP4)
    _check_cases(runtime, "ulysses_ring", ULYSSES_RING_2X2, ulysses_group=runtime.ulysses_group,
                 ring_group=runtime.ring_group)
    _expect_head_error(runtime, "ulysses", 6, 2,
                       ["model.num_heads=6", "parallel.tp=1", "ulysses degree 4"])
    _expect_head_error(runtime, "ulysses_ring", 3, 1,
                       ["model.num_heads=3", "ulysses degree 2"],
                       ulysses_group=runtime.ulysses_group, ring_group=runtime.ring_group)


def test_ulysses_cp2_matches_dense_reference() -> None:
    run_distributed(_world2, world_size=2, cp=2)


def test_ulysses_and_ulysses_ring_cp4_match_dense_reference() -> None:
    run_distributed(_world4, world_size=4, cp=4, cp_sizes=(2, 2))


@pytest.mark.parametrize("cp,u", [(2, 2), (4, 2), (4, 4), (8, 2), (8, 4), (8, 8)])
def test_ulysses_group_shards_are_the_ring_zigzag(cp: int, u: int) -> None:
    from longtrain.attention.ulysses import sequence_positions_after_all_to_all, ulysses_reorder

    t_local = 6
    positions = torch.arange(t_local * cp)
    ring = cp // u
    for g in range(ring):
        gathered = sequence_positions_after_all_to_all(t_local, cp_size=cp, ulysses=u,
                                                       ring_rank=g)
        want = split_for_cp(positions, cp_size=ring, cp_rank=g, dim=0)
        # the key fact: a ulysses group's shards are, as a set, ring rank g's zigzag shard
        assert sorted(gathered.tolist()) == sorted(want.tolist())
        to_ring, to_gathered = ulysses_reorder(t_local, cp_size=cp, ulysses=u, ring_rank=g,
                                               device=torch.device("cpu"))
        assert torch.equal(gathered[to_ring], want)
        assert torch.equal(gathered[to_ring][to_gathered], gathered)


def test_example_cp4_u2() -> None:
    from longtrain.attention.ulysses import sequence_positions_after_all_to_all

    # 8 chunks of 1 token: ranks 0, 1 hold {0, 7}, {1, 6}; ranks 2, 3 hold {2, 5}, {3, 4}
    assert [zigzag_chunk_ids(4, r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    g0 = sequence_positions_after_all_to_all(2, cp_size=4, ulysses=2, ring_rank=0)
    g1 = sequence_positions_after_all_to_all(2, cp_size=4, ulysses=2, ring_rank=1)
    assert g0.tolist() == [0, 7, 1, 6] and g1.tolist() == [2, 5, 3, 4]
    # ring of 2 over 4 super-chunks of 2 tokens: rank 0 holds {0,1 | 6,7}, rank 1 {2,3 | 4,5}
    assert sorted(g0.tolist()) == [0, 1, 6, 7] and sorted(g1.tolist()) == [2, 3, 4, 5]


def _cfg(backend: str, *, cp: int, tp: int = 1, degree: int = 0, heads: int = 8,
         kv_heads: int = 4):
    from longtrain.config.schema import RunConfig

    cfg = RunConfig()
    cfg.attention.backend, cfg.attention.ulysses_degree = backend, degree
    cfg.parallel.world_size, cfg.parallel.cp, cfg.parallel.tp = cp * tp, cp, tp
    cfg.model.num_heads, cfg.model.num_kv_heads = heads, kv_heads
    return cfg


@pytest.mark.parametrize("kwargs,fragments", [
    (dict(backend="ulysses", cp=4, degree=2), ["attention.ulysses_degree=2", "parallel.cp=4"]),
    (dict(backend="ulysses_ring", cp=4, degree=4),
     ["attention.ulysses_degree=4", "parallel.cp=4"]),
    (dict(backend="ulysses_ring", cp=6, degree=4),
     ["attention.ulysses_degree=4", "parallel.cp=6"]),
    (dict(backend="ulysses_ring", cp=3), ["attention.ulysses_degree=0", "parallel.cp=3"]),
    (dict(backend="ulysses", cp=8, heads=12, kv_heads=4),
     ["model.num_heads=12", "parallel.tp=1", "ulysses degree 8"]),
    (dict(backend="ulysses", cp=4, tp=2, heads=12, kv_heads=4),
     ["model.num_heads=12", "parallel.tp=2", "= 6 local query", "ulysses degree 4"]),
    (dict(backend="ulysses_ring", cp=8, degree=4, tp=2, heads=4, kv_heads=2),
     ["model.num_heads=4", "parallel.tp=2", "= 2 local query", "ulysses degree 4"]),
])
def test_ulysses_problems_name_fields_and_values(kwargs: dict, fragments: list[str]) -> None:
    from longtrain.attention.ulysses import ulysses_problems

    found = ulysses_problems(_cfg(**kwargs))
    assert any(all(f in p for f in fragments) for p in found), found


@pytest.mark.parametrize("kwargs", [
    dict(backend="ulysses", cp=4), dict(backend="ulysses", cp=4, degree=4),
    dict(backend="ulysses_ring", cp=4), dict(backend="ulysses_ring", cp=8, degree=4),
    dict(backend="ring", cp=8, kv_heads=1), dict(backend="ulysses", cp=2, tp=2, kv_heads=4),
    # fewer local K/V heads than the degree: replicated (70B at TP=8 has one per rank)
    dict(backend="ulysses", cp=8, heads=8, kv_heads=4),
    dict(backend="ulysses", cp=4, tp=2, heads=8, kv_heads=4),
    dict(backend="ulysses", cp=8, tp=8, heads=64, kv_heads=8),
])
def test_ulysses_problems_accept_valid(kwargs: dict) -> None:
    from longtrain.attention.ulysses import hierarchical_cp_sizes, ulysses_problems

    cfg = _cfg(**kwargs)
    assert ulysses_problems(cfg) == []
    sizes = hierarchical_cp_sizes(cfg.attention.backend, cfg.attention.ulysses_degree,
                                  cfg.parallel.cp)
    if cfg.attention.backend == "ulysses_ring":
        assert sizes is not None and sizes[0] * sizes[1] == cfg.parallel.cp
    else:
        assert sizes is None


@pytest.mark.parametrize("kv,u,copies", [(4, 2, 1), (4, 4, 1), (1, 2, 2), (2, 4, 2), (3, 2, 2),
                                         (1, 8, 8), (6, 4, 2), (8, 8, 1)])
def test_kv_heads_are_replicated_just_enough(kv: int, u: int, copies: int) -> None:
    from longtrain.attention.ulysses import kv_replication

    assert kv_replication(kv, u) == copies
    assert (kv * copies) % u == 0
