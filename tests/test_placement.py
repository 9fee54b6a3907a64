"""Node-aware placement (longtrain.parallel.placement, launch group): ranks ordered by node so
TP groups, then CP groups, stay inside a node; a real two-node Ray cluster on this machine
places a world of 4 at TP = 2 with no TP group across nodes, even when the scheduler
interleaves the slots; `--check` says which nodes each group spans."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.placement import planned_nodes, rank_order, span_lines, spanning


def test_rank_order_groups_slots_by_node():
    slots = ["b", "a", "b", "a", "c", "b"]
    order = rank_order(slots)
    assert [slots[i] for i in order] == ["b", "b", "b", "a", "a", "c"]
    assert sorted(order) == list(range(6)) and order[:3] == [0, 2, 5]
    dims = ParallelDims(world_size=4, tp=2, cp=2)
    interleaved = ["x", "y", "x", "y"]
    # in slot order every TP group would cross nodes; in node order none does
    assert spanning(interleaved, dims, "tp") == [[0, 1], [2, 3]]
    assert spanning([interleaved[i] for i in rank_order(interleaved)], dims, "tp") == []
    lines = span_lines(planned_nodes(64, 8), ParallelDims(world_size=64, tp=8, cp=8))
    assert lines[0] == "tp groups of 8: 8 of 8 inside one node"
    assert lines[1].startswith("cp groups of 8: 0 of 8 inside one node; across nodes: ranks "
                               "0..56 on 8 nodes (node0..node7)")
    with pytest.raises(ValueError, match="3 ranks placed for parallel.world_size=4"):
        spanning(["x"] * 3, dims, "tp")


class NodeReporter:
    """A stand-in rank actor: where it runs."""

    def __init__(self, *, rank: int) -> None:
        self.rank = rank

    def rendezvous(self, *, loopback: bool) -> str:
        return "tcp://127.0.0.1:1"

    def node(self) -> tuple[int, str]:
        import ray

        return self.rank, ray.get_runtime_context().get_node_id()


@pytest.mark.parametrize("strategy", ["PACK", "SPREAD"])
def test_two_ray_nodes_keep_tp_groups_inside_a_node(monkeypatch, strategy):
    """Two Ray nodes (their own node ids and 2 CPUs each) on this machine; the placement group
    is asked to SPREAD too, which interleaves the bundles over the nodes."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster
    import importlib

    pg_module = importlib.import_module("ray.util.placement_group")

    from longtrain_launch import group

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    real = pg_module.placement_group
    monkeypatch.setattr(pg_module, "placement_group",
                        lambda bundles, strategy_=strategy, **kw: real(
                            bundles, strategy=strategy_))
    # both nodes on this machine's own address (Ray's default for a local cluster)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        cfg = SimpleNamespace(
            parallel=SimpleNamespace(world_size=4, tp=2, cp=2),
            launcher=SimpleNamespace(kind="ray", cpus_per_worker=1, gpus_per_worker=0,
                                     timeout_s=60),
            attention=None, output_dir="unused")
        with group.worker_group(cfg, NodeReporter) as wg:
            got = ray.get([w.node.remote() for w in wg.workers], timeout=60)
        assert [r for r, _ in got] == [0, 1, 2, 3]
        nodes = [n for _, n in got]
        assert nodes == wg.nodes and len(set(nodes)) == 2
        dims = ParallelDims(world_size=4, tp=2, cp=2)
        assert spanning(nodes, dims, "tp") == []
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_check_shows_the_nodes_each_group_spans():
    from longtrain.config.schema import RunConfig
    from longtrain.planning.preflight import check_report

    cfg = RunConfig()
    cfg.cluster.preset = "h100-8x8-ib400"
    cfg.parallel.world_size, cfg.parallel.tp, cfg.parallel.cp = 64, 4, 4
    report, _, _ = check_report(cfg)
    assert "nodes (h100-8x8-ib400: 8 devices each, ranks ordered by node):" in report
    assert "tp groups of 4: 16 of 16 inside one node" in report
    assert "cp groups of 4: 0 of 16 inside one node" in report
