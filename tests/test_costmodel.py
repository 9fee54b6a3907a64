"""The cost model (longtrain.planning.costmodel): its equations on hand-computed cases, the fit,
the layout recommendation and the `--check` report (no timing of real hardware here: the fit is
checked against measurements in BENCHMARKS.md)."""

from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import replace

import pytest

from longtrain.config.schema import RunConfig
from longtrain.parallel import collective_cost
from longtrain.planning import cluster, search
from longtrain.planning import costmodel as cm

LINK = collective_cost.Link(gbytes_per_s=1.0, latency_s=1e-3)


def _cfg(**over) -> RunConfig:
    cfg = RunConfig()
    cfg.model.name, cfg.model.vocab_size, cfg.model.hidden_size = "test", 32000, 4096
    cfg.model.intermediate_size, cfg.model.num_layers = 14336, 32
    cfg.model.num_heads, cfg.model.num_kv_heads = 32, 8
    cfg.model.max_position_embeddings = 131072
    cfg.data.seq_len, cfg.data.batch_size = 131072, 1
    cfg.parallel.world_size, cfg.parallel.tp, cfg.parallel.cp = 64, 8, 8
    cfg.attention.backend, cfg.train.precision = "ring", "bf16"
    cfg.cluster.preset = "h100-8x8-ib400"
    for dotted, value in over.items():
        group, name = dotted.split("__")
        setattr(getattr(cfg, group), name, value)
    return cfg


def test_fit_line_recovers_latency_and_bandwidth():
    rng = random.Random(0)
    sizes = [2.0 ** k for k in range(12, 26, 2)]
    latency, bandwidth = 37e-6, 2.5e9
    times = [latency + n / bandwidth * (1 + rng.uniform(-0.01, 0.01)) for n in sizes]
    a, b = cluster.fit_line(sizes, times)
    assert a == pytest.approx(latency, rel=0.2)
    assert 1 / b == pytest.approx(bandwidth, rel=0.02)
    with pytest.raises(ValueError, match="2 distinct"):
        cluster.fit_line([1.0, 1.0], [1.0, 2.0])
    # relative noise over sizes spanning decades: weights 1 / t^2 recover the latency that the
    # large messages drown in the unweighted fit
    times = [latency + n / bandwidth * (1 + rng.uniform(-0.05, 0.05)) for n in sizes]
    a, b = cluster.fit_line(sizes, times, weights=[1 / t ** 2 for t in times])
    assert a == pytest.approx(latency, rel=0.05)
    assert 1 / b == pytest.approx(bandwidth, rel=0.1)


def test_collectives_follow_the_ring_formulas():
    n = 8e6
    assert collective_cost.p2p(n, LINK) == pytest.approx(1e-3 + 8e-3)
    assert collective_cost.all_reduce(n, 4, LINK) == pytest.approx(6 * (1e-3 + 2e-3))
    assert collective_cost.all_gather(n, 4, LINK) == pytest.approx(3 * (1e-3 + 8e-3))
    assert collective_cost.all_to_all(n, 4, LINK) == pytest.approx(3 * (1e-3 + 2e-3))
    assert collective_cost.all_reduce(n, 1, LINK) == collective_cost.all_to_all(n, 1, LINK) == 0.0


def test_ring_hides_behind_compute_and_exposes_only_the_excess():
    kv, acc, c = 4e6, 8e6, 4
    hop = collective_cost.p2p(kv, LINK)  # 1 ms + 4 ms = 5 ms
    dkv = collective_cost.p2p(acc, LINK)  # 1 ms + 8 ms = 9 ms
    # a block's compute (fwd / c = 50 ms) longer than any K/V hop: the rotations cost nothing;
    # only the c dK/dV transfers, waited for before each block (ring.py), are exposed
    slow = 4 * 0.05
    exposed, detail = collective_cost.ring_exposed(kv, slow, c, LINK, acc)
    assert detail.hidden and exposed == pytest.approx(4 * 9e-3)
    # blocks of 1 ms: each of the 3 forward hops exposes 5 - 1 = 4 ms, each of the 3 backward
    # K/V hops against a 2 ms backward block 3 ms, plus the 4 dK/dV transfers of 9 ms
    exposed, detail = collective_cost.ring_exposed(kv, 4 * 1e-3, c, LINK, acc)
    assert not detail.hidden and detail.hop_s == pytest.approx(hop)
    assert exposed == pytest.approx(3 * 4e-3 + 3 * 3e-3 + 4 * dkv)


def test_ulysses_bytes_match_the_attention_benchmark():
    from benchmarks.attention import sent_mib

    # 2 ranks, 8 heads x 64, T=4096, fp32: 8 all-to-alls of half a [T/2, H, D] tensor
    shape = collective_cost.AttentionShape(4096, 1, 8, 8, 64, 4)
    link = collective_cost.Link(1.0, 0.0)
    exposed, _ = cm.attention_comm("ulysses", shape, c=2, link=link, fwd_attention_s=1.0)
    sent = sent_mib("ulysses", length=4096, heads=8, head_dim=64, elt_bytes=4, cp=2)
    assert exposed * 1e9 == pytest.approx(sent * 2 ** 20)


def test_allgather_reduce_scatters_full_length_grads_and_skips_the_future():
    shape = collective_cost.AttentionShape(4096, 1, 8, 8, 64, 4)
    link = collective_cost.Link(1.0, 0.0)
    exposed, detail = cm.attention_comm("allgather", shape, c=2, link=link, fwd_attention_s=1.0)
    full = 4096 * 8 * 64 * 4  # one of K, V for the whole sequence
    # forward: K and V gathered (each rank sends its half); backward: dK and dV
    # reduce-scattered (each rank sends the other's half), not all-reduced (twice that)
    assert detail is None
    assert exposed * 1e9 == pytest.approx(2 * full / 2 + 2 * full / 2)
    local = cluster.PRESETS["cpu-local"]
    ring, _, _ = cm.attention_op("ring", shape, c=2, cluster=local)
    gathered, _, _ = cm.attention_op("allgather", shape, c=2, cluster=local)
    # its blocks skip the future (no mask over all T/c x T pairs): ring's causal share
    assert gathered / ring == pytest.approx(1.0)


def test_gradients_travel_in_the_reduction_dtype():
    h100 = cluster.PRESETS["h100-8x8-ib400"]
    bf16 = cm.predict(_cfg(optim__grad_reduce_dtype="param"), h100)
    fp32 = cm.predict(_cfg(train__precision="fp32"), h100)
    # the same all-reduce over the same CP x DP group of 8: latency + half the bytes
    lat = 2 * 7 * h100.inter.latency_s
    assert bf16.comm_s["dp"] - lat == pytest.approx((fp32.comm_s["dp"] - lat) / 2)
    # bf16 parameters, gradients summed in fp32 (the default): fp32's bytes
    assert cm.predict(_cfg(), h100).comm_s["dp"] == pytest.approx(fp32.comm_s["dp"])


def test_offload_traffic_is_exposed_beyond_the_compute():
    from longtrain.memory.estimate import Policy, Shape, activation_bytes

    h100 = cluster.PRESETS["h100-8x8-ib400"]
    cfg = _cfg(memory__offload=True, parallel__tp=2, parallel__cp=32)
    p = cm.predict(cfg, h100)
    moved = h100.host.time(activation_bytes(Shape.of(cfg), Policy(offload=True))["layers"])
    fwd = p.compute_s / 3
    assert p.comm_s["offload"] == pytest.approx(max(0, moved - fwd) + max(0, moved - 2 * fwd))
    assert "memory.offload=true" in p.overrides
    # no host link (the CPU preset): offloading is not a candidate and costs nothing
    assert "offload" not in cm.predict(_cfg(memory__offload=True, parallel__world_size=2,
                                            parallel__tp=1, parallel__cp=2,
                                            cluster__preset="cpu-local"),
                                       cluster.PRESETS["cpu-local"]).comm_s


def test_groups_inside_a_node_use_its_link_and_spanning_ones_the_nic():
    h100 = cluster.PRESETS["h100-8x8-ib400"]
    assert h100.link(8) is h100.intra and h100.link(16) is h100.inter
    # tp 8 x cp 8: the CP group spans the nodes, so its ring runs at the NIC's pace
    inside = cm.predict(_cfg(parallel__world_size=8, parallel__cp=1, attention__backend="dense",
                             cluster__preset="h100-1x8"), cluster.PRESETS["h100-1x8"])
    assert inside.comm_s["cp"] == 0.0
    one = cm.predict(_cfg(), h100)
    faster = replace(h100, inter=replace(h100.inter, gbytes_per_s=500.0))
    assert cm.predict(_cfg(), faster).comm_s["dp"] < one.comm_s["dp"]


def test_more_cp_lowers_compute_per_rank_and_mfu_is_consistent():
    h100 = cluster.PRESETS["h100-8x8-ib400"]
    with pytest.raises(ValueError, match="data.batch_size=1 is not a multiple of dp"):
        cm.predict(_cfg(parallel__tp=8, parallel__cp=4), h100)
    b = cm.predict(_cfg(parallel__tp=8, parallel__cp=8), h100)
    # the same sequence over half the ranks: twice the compute per rank
    c4 = cm.predict(_cfg(parallel__tp=8, parallel__cp=4, parallel__world_size=32,
                         cluster__nodes=4), replace(h100, nodes=4))
    assert b.compute_s == pytest.approx(c4.compute_s / 2, rel=1e-6)
    from longtrain.model.flops import step_flops

    assert b.mfu == pytest.approx(step_flops(_cfg()).total / b.step_s / (64 * 989e12))
    assert b.step_s == pytest.approx(b.compute_s + sum(b.comm_s.values()))


def test_recommend_returns_valid_layouts_that_fit_fastest_first():
    from longtrain.planning.validate import problems
    from longtrain.memory.estimate import GIB, estimates

    cfg = _cfg()
    h100 = cluster.PRESETS["h100-8x8-ib400"]
    best = search.recommend(cfg, h100, top=5)
    assert len(best) >= 3
    assert [p.step_s for p in best] == sorted(p.step_s for p in best)
    for p in best:
        over = dict(x.split("=") for x in p.overrides.split())
        cand = _cfg(parallel__tp=int(over["parallel.tp"]), parallel__cp=int(over["parallel.cp"]),
                    attention__backend=over["attention"])
        assert problems(cand) == [], p.overrides
        assert min(e.total for e in estimates(cand, on_gpu=True)) <= 80 * GIB
        assert p.memory_gib <= 80 and int(over["parallel.tp"]) <= 8
    # every candidate that is valid and fits is ranked no faster than the first
    for cand in search.candidate_configs(cfg, h100):
        if not problems(cand) and any(e.total <= 80 * GIB for e in estimates(cand, on_gpu=True)):
            assert cm.predict(cand, h100).step_s >= best[0].step_s * 0.999


def test_bad_cluster_fields_are_named():
    from longtrain.planning.validate import problems

    found = problems(_cfg(cluster__preset="dgx9000"))
    assert any("cluster.preset='dgx9000'" in p and "h100-8x8-ib400" in p for p in found)
    found = problems(_cfg(cluster__nodes=4))
    assert any("cluster.nodes * cluster.devices_per_node = 4 * 8 = 32 != "
               "parallel.world_size=64" in p for p in found)
    found = problems(_cfg(cluster__inter_node_gbit=-1.0))
    assert any("cluster.inter_node_gbit=-1.0 must be a positive number" in p for p in found)
    found = problems(_cfg(cluster__preset="none", cluster__nodes=8))
    assert any("cluster.nodes is set but cluster.preset=none" in p for p in found)
    # the fitted preset of this machine: 1 node x 2 devices
    found = problems(_cfg(cluster__preset="cpu-local"))
    assert any("= 2 != parallel.world_size=64" in p for p in found)
    small = _cfg(cluster__preset="cpu-local", parallel__world_size=2, parallel__tp=1,
                 parallel__cp=2)
    assert not [p for p in problems(small) if "cluster" in p]


def test_check_prints_the_prediction_and_the_recommendation():
    res = subprocess.run(
        [sys.executable, "-m", "longtrain_launch.train", "--check", "model=8b",
         "parallel.world_size=64", "parallel.tp=8", "parallel.cp=8", "attention=ring",
         "data.seq_len=131072", "data.batch_size=1", "train.precision=bf16",
         "cluster=h100-8x8-ib400", "cluster.inter_node_gbit=200"],
        capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "predicted on h100-8x8-ib400" in out and "inter 25 GB/s" in out
    assert "this layout (tp 8 x cp 8 x dp 1, ring):" in out
    assert "recommended layouts" in out and "1. parallel.tp=" in out
    # the memory verdict is the cluster's 80 GiB devices, not this machine's RAM
    assert "budget 80.00 GiB: fits" in out


def test_the_chunked_loss_costs_one_more_lm_head_forward():
    """train.loss_chunk below a rank's share of the sequence: the head's forward again, over
    this rank's tokens, at the GEMM efficiency (times the memory policy's factor); MFU's model
    FLOPs do not count it."""
    h100 = cluster.PRESETS["h100-8x8-ib400"]
    whole = cm.predict(_cfg(train__loss_chunk=0), h100)
    chunked = cm.predict(_cfg(train__loss_chunk=4096), h100)
    cost = cm.recompute_cost(cm.Shape.of(_cfg()), cm.Policy())
    extra = 2.0 * 4096 * 32000 * 131072 / 64 / (989e12 * h100.gemm_eff) * cost
    assert chunked.compute_s - whole.compute_s == pytest.approx(extra, rel=1e-9)
    # one chunk covers the rank's 16K tokens: nothing recomputed
    assert cm.predict(_cfg(train__loss_chunk=16384), h100).compute_s == whole.compute_s
    assert chunked.mfu < whole.mfu
