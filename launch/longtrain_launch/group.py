"""The Ray worker group shared by `longtrain-train` and `longtrain-eval`: a placement group
with one bundle per rank, one actor per bundle with ranks ordered by node, rank 0's
rendezvous address, and teardown on every exit path.

`RankActor` is the plain-Python base of the per-rank actors (the group wraps a class with
`ray.remote`, so importing an actor module needs no Ray).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Protocol

from longtrain.attention.plan import cp_group_sizes
from longtrain.config.errors import ConfigError
from longtrain.config.schema import AttentionConfig, LauncherConfig, ParallelConfig
from longtrain.observability.log import configure_logging, get_logger
from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.placement import rank_order, span_lines, spanning
from longtrain.parallel.runtime import init_parallel
from longtrain_launch.slurm import job_signals_ignored_by_children

if TYPE_CHECKING:
    from longtrain.parallel.runtime import ParallelRuntime


class GroupConfig(Protocol):
    """What the group reads of a run's config (RunConfig and EvalRunConfig both have it)."""

    attention: AttentionConfig
    parallel: ParallelConfig
    launcher: LauncherConfig
    output_dir: str


def init_ray(cfg: GroupConfig) -> bool:
    """Start or join Ray; True when this process started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray >= 2.50 announces at every start that token authentication is on (it stays on):
    # a line per run that tells a longtrain user nothing to act on
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    if cfg.launcher.kind == "local":
        needed = cfg.parallel.world_size * cfg.launcher.cpus_per_worker
        # Ray's processes must outlive a Slurm warning signal (see launch/longtrain_launch/slurm.py).
        # address="local": a new Ray even when a `ray start` cluster runs on this machine
        # (with no address, ray.init joins the one named in /tmp/ray/ray_current_cluster)
        with job_signals_ignored_by_children():
            ray.init(address="local", num_cpus=max(needed, os.cpu_count() or 1),
                     include_dashboard=False, log_to_driver=False, configure_logging=True,
                     logging_level="WARNING", _node_ip_address="127.0.0.1")
    else:
        wait_for_head(cfg.launcher.address, timeout_s=cfg.launcher.connect_timeout_s)
        ray.init(address=cfg.launcher.address, log_to_driver=False, logging_level="WARNING")
    return True


@contextmanager
def ray_session(cfg: GroupConfig) -> Iterator[None]:
    """Ray for one entry point's life, started once: joined when already running in this
    process, else started (`init_ray`) and shut down when the block ends."""
    import ray

    owns_ray = init_ray(cfg)
    try:
        yield
    finally:
        if owns_ray:
            ray.shutdown()


class HeadUnreachable(ConfigError):
    """launcher.address names no Ray head that answers."""


def _head_host_port(address: str) -> tuple[str, int] | None:
    """host and port of a head address (`host:port` or `ray://host:port`); None for `auto`,
    which Ray resolves from the cluster started on this machine."""
    if address in ("auto", "local"):
        return None
    rest = address.split("://", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise HeadUnreachable([f"launcher.address={address!r} is not <host>:<port> "
                               f"(e.g. 10.0.0.1:6379, ray://10.0.0.1:10001 or auto)"])
    return host.strip("[]"), int(port)


def wait_for_head(address: str | None, *, timeout_s: float, poll_s: float = 1.0) -> None:
    """Return once something accepts TCP connections at the head's address; raise
    HeadUnreachable naming it after `timeout_s` (a head that is still starting gets that
    long)."""
    if address is None:
        raise HeadUnreachable(["launcher.kind=ray needs launcher.address (<host>:<port> of a "
                               "running Ray head, or auto)"])
    target = _head_host_port(address)
    if target is None:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(target, timeout=min(5.0, max(timeout_s, 0.1))):
                return
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
        if time.monotonic() + poll_s > deadline:
            raise HeadUnreachable([
                f"launcher.address={address}: no Ray head answers there ({reason}) after "
                f"{timeout_s:g} s (launcher.connect_timeout_s); start one with `ray start "
                f"--head --port={target[1]}` on {target[0]}, or fix the address"])
        time.sleep(poll_s)


def quiet_third_party() -> None:
    # megatron-core warns at import that Transformer Engine / Apex are absent: expected here.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


class RankActor:
    """One rank of the group: logs to `<output_dir>/logs/rank<N>.log`, answers the
    rendezvous (rank 0) and joins torch.distributed with the run's layout."""

    def __init__(self, *, rank: int, cfg: GroupConfig) -> None:
        quiet_third_party()
        if cfg.launcher.kind == "local":
            # One machine: keep gloo's pair connections on loopback too.
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        self.rank = rank
        self.cfg = cfg
        self.log_file = os.path.join(cfg.output_dir, "logs", f"rank{rank}.log")
        configure_logging(rank=rank, log_file=self.log_file, console=False)

    def rendezvous(self, *, loopback: bool) -> str:
        """A `tcp://host:port` on this actor's node with a port free right now (rank 0 only).

        A single-machine group rendezvous on loopback; a cluster on the node's address.
        """
        import ray

        host = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        return f"tcp://{host}:{port}"

    def join(self, init_method: str) -> "ParallelRuntime":
        """Join the world and build the TP / CP / DP (and 2-D CP) groups of `cfg`; the caller
        ends with `longtrain.parallel.runtime.shutdown_parallel()`."""
        import torch

        cfg = self.cfg
        torch.set_num_threads(max(1, cfg.launcher.cpus_per_worker))
        cp_sizes = cp_group_sizes(cfg.attention, cfg.parallel.cp)
        return init_parallel(ParallelDims.from_config(cfg.parallel), rank=self.rank,
                             init_method=init_method, backend=cfg.parallel.backend,
                             timeout_s=cfg.parallel.timeout_s, cp_sizes=cp_sizes)


@dataclass(frozen=True)
class WorkerGroup:
    """Actor handles in rank order, the address every rank joins torch.distributed at, and
    the Ray node id each rank runs on."""

    workers: list[Any]
    init_method: str
    nodes: list[str]


def _placed_in_node_order(pg: Any, cfg: GroupConfig) -> tuple[list[int], list[str]]:
    """(the bundle of each rank, the node of each rank): bundles grouped by node
    (`longtrain.parallel.placement`), logged, with a warning naming any TP group that still
    spans nodes (a node holding a number of bundles that is not a multiple of parallel.tp)."""
    from ray.util.placement_group import placement_group_table

    table = placement_group_table(pg)["bundles_to_node_id"]
    bundle_nodes = [str(table[i]) for i in range(cfg.parallel.world_size)]
    order = rank_order(bundle_nodes)
    nodes = [bundle_nodes[b] for b in order]
    dims = ParallelDims.from_config(cfg.parallel)
    short = {n: f"node{i}" for i, n in enumerate(dict.fromkeys(nodes))}
    log = get_logger()
    log.info("ranks by node: %s", ", ".join(f"{short[n]} ({n[:8]}): ranks "
                                            f"{[r for r, m in enumerate(nodes) if m == n]}"
                                            for n in short))
    for line in span_lines(nodes, dims, names=short):
        log.info("placement: %s", line)
    split = spanning(nodes, dims, "tp")
    if split:
        log.warning("tensor-parallel groups span nodes (their all-reduces cross the network): "
                    "%s; give each node a multiple of parallel.tp=%d ranks",
                    split[:4], cfg.parallel.tp)
    return order, nodes


@contextmanager
def worker_group(cfg: GroupConfig, actor_cls: type, /, **actor_kwargs: Any
                 ) -> Iterator[WorkerGroup]:
    """Start `parallel.world_size` actors `actor_cls(rank=r, **actor_kwargs)` in a placement
    group (one bundle per rank) of the Ray the entry point started, ranks ordered by node
    (TP groups, then CP groups, inside a node), ask rank 0 for the rendezvous
    (`actor_cls.rendezvous`), and tear everything down when the block ends, however it ends.
    `cfg` and `actor_cls` are positional-only, so the actors' own keyword arguments may
    include `cfg=`."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if not ray.is_initialized():
        raise RuntimeError("worker_group needs Ray started by its entry point "
                           "(ray_session(cfg), as driver.run and the eval app do)")
    world = cfg.parallel.world_size
    bundle = {"CPU": cfg.launcher.cpus_per_worker}
    if cfg.launcher.gpus_per_worker:
        bundle["GPU"] = cfg.launcher.gpus_per_worker
    pg = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
    workers: list[Any] = []
    try:
        ray.get(pg.ready(), timeout=cfg.launcher.timeout_s)
        order, nodes = _placed_in_node_order(pg, cfg)
        remote_actor = ray.remote(actor_cls)
        for rank in range(world):
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=order[rank])
            workers.append(remote_actor.options(
                num_cpus=cfg.launcher.cpus_per_worker, num_gpus=cfg.launcher.gpus_per_worker,
                scheduling_strategy=strategy, name=None,
                # > 1: a control call (e.g. a stop request) runs beside the long-running one
                max_concurrency=getattr(actor_cls, "max_concurrency", 1),
            ).remote(rank=rank, **actor_kwargs))
        loopback = cfg.launcher.kind == "local"
        init_method = ray.get(workers[0].rendezvous.remote(loopback=loopback),
                              timeout=cfg.launcher.timeout_s)
        get_logger().info("worker group: %d ranks, rendezvous %s", world, init_method)
        yield WorkerGroup(workers=workers, init_method=init_method, nodes=nodes)
    finally:
        for w in workers:
            ray.kill(w, no_restart=True)
        remove_placement_group(pg)
