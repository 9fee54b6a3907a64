"""The training driver: the Ray worker group (`group.py`: one actor per rank, clean teardown
on every exit path) with metrics streamed from rank 0 to the console and W&B."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from longtrain.config.schema import RunConfig
from longtrain.observability.progress import Progress, RunSummary


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train `cfg` on a Ray worker group; returns the run summary."""
    import ray

    from longtrain.observability.wandb_run import WandbRun
    from longtrain_launch.group import worker_group
    from longtrain_launch.worker import Worker

    started = time.perf_counter()
    wandb_run = None
    progress = Progress(total=cfg.train.steps, enabled=cfg.logging.progress)
    summary = RunSummary()
    try:
        with worker_group(cfg, Worker, cfg=cfg) as group:
            try:
                wandb_run = WandbRun(cfg.logging.wandb, config=dataclasses.asdict(cfg),
                                     output_dir=cfg.output_dir)
                workers, init_method = group.workers, group.init_method
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
    summary.wall_time_s = time.perf_counter() - started
    result = summary.as_dict()
    if wandb_run is not None:
        wandb_run.finish(result)
        result["wandb_dir"] = wandb_run.directory
    result["output_dir"] = cfg.output_dir
    if cfg.train.save_hf:
        result["hf_dir"] = os.path.join(cfg.output_dir, "hf")
    return result
