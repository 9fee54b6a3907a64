"""The Ray driver: a placement group with one bundle per rank, one worker actor per bundle,
metrics streamed from rank 0 to the console and W&B, clean teardown on every exit path."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from longtrain.config.schema import RunConfig
from longtrain.observability.log import get_logger
from longtrain.observability.progress import Progress, RunSummary


def _init_ray(cfg: RunConfig) -> bool:
    """Start or join Ray; True when this process started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if cfg.launcher.kind == "local":
        needed = cfg.parallel.world_size * cfg.launcher.cpus_per_worker
        ray.init(num_cpus=max(needed, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False, configure_logging=True, logging_level="WARNING",
                 _node_ip_address="127.0.0.1")
    else:
        ray.init(address=cfg.launcher.address, log_to_driver=False, logging_level="WARNING")
    return True


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train `cfg` on a Ray worker group; returns the run summary."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from longtrain.observability.wandb_run import WandbRun
    from longtrain_launch.worker import Worker

    log = get_logger()
    world = cfg.parallel.world_size
    started = time.perf_counter()
    owns_ray = _init_ray(cfg)
    bundle = {"CPU": cfg.launcher.cpus_per_worker}
    if cfg.launcher.gpus_per_worker:
        bundle["GPU"] = cfg.launcher.gpus_per_worker
    pg = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
    workers: list[Any] = []
    wandb_run = None
    progress = Progress(total=cfg.train.steps, enabled=cfg.logging.progress)
    summary = RunSummary()
    try:
        ray.get(pg.ready(), timeout=cfg.launcher.timeout_s)
        remote_worker = ray.remote(Worker)
        for rank in range(world):
            strategy = PlacementGroupSchedulingStrategy(placement_group=pg,
                                                        placement_group_bundle_index=rank)
            workers.append(remote_worker.options(
                num_cpus=cfg.launcher.cpus_per_worker, num_gpus=cfg.launcher.gpus_per_worker,
                scheduling_strategy=strategy, name=None,
            ).remote(rank=rank, cfg=cfg))
        loopback = cfg.launcher.kind == "local"
        init_method = ray.get(workers[0].rendezvous.remote(loopback=loopback),
                              timeout=cfg.launcher.timeout_s)
        log.info("worker group: %d ranks, rendezvous %s", world, init_method)
        wandb_run = WandbRun(cfg.logging.wandb, config=dataclasses.asdict(cfg),
                             output_dir=cfg.output_dir)
        others = [w.run.remote(init_method) for w in workers[1:]]
        stream = workers[0].stream.options(num_returns="streaming").remote(init_method)
        for ref in stream:
            metrics = ray.get(ref, timeout=cfg.launcher.timeout_s)
            summary.add(metrics)
            progress.update(metrics)
            wandb_run.log(metrics, step=int(metrics["step"]))
        ray.get(others, timeout=cfg.launcher.timeout_s)
    except BaseException:
        if wandb_run is not None:
            wandb_run.finish(summary.as_dict(), exit_code=1)
            wandb_run = None
        raise
    finally:
        progress.close()
        for w in workers:
            ray.kill(w, no_restart=True)
        remove_placement_group(pg)
        if owns_ray:
            ray.shutdown()
    summary.wall_time_s = time.perf_counter() - started
    result = summary.as_dict()
    if wandb_run is not None:
        wandb_run.finish(result)
        result["wandb_dir"] = wandb_run.directory
    result["output_dir"] = cfg.output_dir
    if cfg.train.save_hf:
        result["hf_dir"] = os.path.join(cfg.output_dir, "hf")
    return result
