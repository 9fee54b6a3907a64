"""The planner side of optim.zero=3 (FSDP over CP x DP): the model state per rank
(`static_bytes`), its communication in the cost model (`fsdp_comm`), and the layout search's
use of it only where a layout fits no other way. Arithmetic only: no process groups."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from longtrain.config.schema import RunConfig
from longtrain.memory.estimate import GIB, Shape, estimates, static_bytes
from longtrain.parallel.collective_cost import Link, all_reduce
from longtrain.planning import costmodel as cm
from longtrain.planning import search
from longtrain.planning.cluster import PRESETS

H100 = PRESETS["h100-8x8-ib400"]


def _cfg(*, world: int = 64, tp: int = 8, cp: int = 8, zero: int = 0, **model) -> RunConfig:
    """An 8B-shaped bf16 run at 128K tokens on the 8 x 8 H100 preset (`model` overrides the
    shape)."""
    cfg = RunConfig()
    m = cfg.model
    m.name, m.vocab_size, m.hidden_size, m.intermediate_size = "test", 32000, 4096, 14336
    m.num_layers, m.num_heads, m.num_kv_heads = 32, 32, 8
    m.max_position_embeddings = 131072
    for k, v in model.items():
        setattr(m, k, v)
    cfg.data.seq_len, cfg.data.batch_size = 131072, 1
    cfg.parallel.world_size, cfg.parallel.tp, cfg.parallel.cp = world, tp, cp
    cfg.attention.backend, cfg.train.precision = "ring", "bf16"
    cfg.cluster.preset, cfg.optim.zero = "h100-8x8-ib400", zero
    return cfg


def _narrow() -> Shape:
    """Many layers and a small vocabulary: the gathered working set is a small part."""
    return Shape.of(_cfg(world=1, tp=1, cp=1, vocab_size=1024, hidden_size=1024,
                         intermediate_size=4096, num_layers=48, num_heads=16, num_kv_heads=4,
                         zero=3))


def test_zero3_state_per_rank_is_a_quarter_at_four_ranks_plus_the_gathered_set() -> None:
    s = _narrow()
    p = s.params
    one, four = static_bytes(s, zero=3, shards=1), static_bytes(s, zero=3, shards=4)
    assert four["params"] == four["grads"] == 4 * p / 4 and four["optimizer"] == 8 * p / 4
    # the root (embedding, norm, head) gathered and its gradients held in bf16, two layers
    # gathered in bf16, one layer's gradients in fp32 for the reduce-scatter
    assert s.param_elem == 2 and s.grad_elem == 4
    assert four["gathered"] == 2 * 2 * s.root_params + (2 * 2 + 4) * s.largest_layer_params
    assert four["gathered"] == one["gathered"]
    assert four["total"] == pytest.approx(sum(v for k, v in four.items() if k != "total"))
    # the target: at most 0.3x of world 1 (unsharded, and zero 3 over one rank)
    assert four["total"] <= 0.3 * static_bytes(s, zero=0, shards=1)["total"]
    assert four["total"] <= 0.3 * one["total"]
    # every unsharded part shrinks no further: 64 ranks leave the gathered set on top
    many = static_bytes(s, zero=3, shards=64)
    assert many["total"] - many["gathered"] == pytest.approx(16 * p / 64)


def test_the_gathered_set_grows_with_the_root_not_the_group() -> None:
    small = _narrow()
    big = replace(small, root_params=small.root_params + 1000)
    grown = (static_bytes(big, zero=3, shards=8)["gathered"]
             - static_bytes(small, zero=3, shards=8)["gathered"])
    # the root's bf16 parameters and its bf16 gradients, unsharded
    assert grown == 2 * 2 * 1000
    # the root and the layers make up the parameters
    cfg = _cfg(world=1, tp=1, cp=1)
    s = Shape.of(cfg)
    assert s.root_params == 2 * 32000 * 4096 + 4096
    assert s.params == s.root_params + 32 * s.largest_layer_params


def test_zero3_gradients_travel_in_the_reduction_dtype() -> None:
    assert Shape.of(_cfg(zero=3)).grad_elem == 4
    cfg = _cfg(zero=3)
    cfg.optim.grad_reduce_dtype = "param"
    assert Shape.of(cfg).grad_elem == 2


def test_zero1_and_2_shard_over_cp_times_dp() -> None:
    # tp 2 x cp 4 x dp 8: DeepSpeed's group is CP x DP, 32 ranks, not dp = 8
    for zero in (1, 2):
        cfg = _cfg(tp=2, cp=4, zero=zero)
        cfg.data.batch_size = 8
        s = Shape.of(cfg)
        got = {e.static for e in estimates(cfg, on_gpu=True)}
        assert got == {static_bytes(s, zero=zero, shards=32)["total"]}
        assert static_bytes(s, zero=zero, shards=8)["total"] > got.pop()
    s = Shape.of(_cfg(tp=2, cp=4, zero=2))
    two = static_bytes(s, zero=2, shards=32)
    assert two["grads"] == s.grad_elem * s.params / 32
    assert two["optimizer"] == (8 + 4) * s.params / 32 and two["params"] == 2 * s.params


def test_fsdp_traffic_scales_as_n_minus_one_over_n() -> None:
    s = Shape.of(_cfg(world=8, tp=8, cp=1, zero=3))
    link = Link(gbytes_per_s=1.0, latency_s=0.0)
    e, g, p, r = s.param_elem, s.grad_elem, s.params, s.root_params
    lx = s.largest_layer_params
    # nothing to hide behind: every byte is exposed; the root is gathered once (FSDP2 keeps
    # the root gathered after the forward), the layers twice but the last (kept gathered
    # into its backward), every gradient reduce-scattered
    whole = (e * (2 * p - r - lx) + g * p) / 1e9
    times = {}
    for n in (2, 4, 8, 16):
        times[n] = cm.fsdp_comm(s, n=n, link=link, fwd_layer_s=0.0)
        assert times[n] == pytest.approx(whole * (n - 1) / n, rel=1e-9), n
    assert times[16] / times[2] == pytest.approx((15 / 16) / (1 / 2))
    assert cm.fsdp_comm(s, n=1, link=link, fwd_layer_s=0.0) == 0.0
    # long layers hide every prefetched gather and reduce-scatter: left exposed are the
    # root's and the first layer's gather forward and the last reduce-scatters (a layer's
    # and the root's)
    hidden = cm.fsdp_comm(s, n=4, link=link, fwd_layer_s=10.0)
    assert hidden == pytest.approx(((e * r + e * lx) / 4 * 3 + (g * lx + g * r) * 3 / 4)
                                   / 1e9, rel=1e-9)
    assert hidden < times[4]


def test_predict_counts_fsdp_per_micro_batch_in_place_of_the_all_reduce() -> None:
    cfg0 = _cfg(tp=8, cp=4)
    cfg0.data.batch_size = 2  # dp 2, one micro-batch each
    plain = cm.predict(cfg0, H100)
    s = Shape.of(cfg0)
    assert "fsdp" not in plain.comm_s
    assert plain.comm_s["dp"] == pytest.approx(all_reduce(s.params * s.grad_elem, 8,
                                                          H100.inter))
    cfg3 = copy.deepcopy(cfg0)
    cfg3.optim.zero = 3
    sharded = cm.predict(cfg3, H100)
    assert "dp" not in sharded.comm_s and sharded.comm_s["fsdp"] > 0
    assert sharded.zero == 3 and "optim.zero=3" in sharded.overrides
    assert sharded.compute_s == pytest.approx(plain.compute_s)
    # twice the micro-batches: twice the gathers and reduce-scatters
    cfg3.data.batch_size = 4
    assert cm.predict(cfg3, H100).comm_s["fsdp"] == pytest.approx(2 * sharded.comm_s["fsdp"])


def test_search_shards_only_the_layouts_that_fit_no_other_way() -> None:
    cfg = _cfg()
    ranked = search.recommend(cfg, H100, top=100)
    zeros = {p.zero for p in ranked}
    assert zeros == {0, 3}, [(p.layout, p.zero) for p in ranked]
    for p in ranked:
        over = dict(x.split("=") for x in p.overrides.split() if x.startswith(("parallel",
                                                                               "attention")))
        cand = _cfg(tp=int(over["parallel.tp"]), cp=int(over["parallel.cp"]))
        cand.attention.backend = over["attention"]
        unsharded = search.fastest_fitting(cand, H100)
        if p.zero == 3:
            assert unsharded is None, p.overrides
        else:
            assert unsharded is not None and unsharded.step_s == pytest.approx(p.step_s)
    # tp 1 x cp 64: 8B's unsharded state alone is over 80 GiB; sharded over 64 ranks it fits
    cand = _cfg(tp=1, cp=64)
    assert search.fastest_fitting(cand, H100) is None
    assert search.layout_prediction(cand, H100).zero == 3
    # a layout with nothing to shard over (one CP x DP rank) stays as it is
    assert search.fully_sharded(_cfg(world=8, tp=8, cp=1)) is None
    assert search.fully_sharded(_cfg(zero=3)) is None


def test_offload_is_bounded_by_the_host_memory() -> None:
    # tp 1 x cp 2: 64K tokens of 8B per rank; offloading all saved activations is the
    # fastest policy while the host holds them (~290 GiB)
    cfg = _cfg(tp=1, cp=2, zero=3)
    cfg.data.batch_size = 32
    free = search.fastest_fitting(cfg, replace(H100, host_memory_gib=None))
    assert free.memory_policy == "offload" and free.host_gib > H100.host_memory_gib
    # the preset's host (192 GiB per GPU) takes int8-stored activations, at some cost
    preset = search.fastest_fitting(cfg, H100)
    assert "offload" in preset.memory_policy and preset.host_gib <= H100.host_memory_gib
    assert preset.step_s > free.step_s
    bounded = search.fastest_fitting(cfg, replace(H100, host_memory_gib=1.0))
    assert "offload" not in bounded.memory_policy and not bounded.host_gib
    assert bounded.step_s > preset.step_s


def test_smallest_need_is_no_more_than_any_valid_layout() -> None:
    cfg = _cfg()
    cfg.memory.budget_gib = 1.0
    assert search.recommend(cfg, H100) == []
    gib, what = search.smallest_need(cfg, H100)
    assert gib > 1.0 and "memory " in what
    for tp, cp in ((8, 8), (1, 64), (4, 16)):
        for zero in (0, 3):
            cand = _cfg(tp=tp, cp=cp, zero=zero)
            assert gib <= min(e.total for e in estimates(cand, on_gpu=True)
                              if not e.policy.offload or search.fits_host(e, H100)) / GIB
    lines = search.report_lines(cfg)
    assert any("no layout of this world size fits" in x and f"needs {gib:.1f} GiB" in x
               for x in lines), lines
