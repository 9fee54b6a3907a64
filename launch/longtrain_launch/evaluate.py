"""`longtrain-eval`: the Hydra app. Compose conf/longtrain_conf/eval.yaml -> typed EvalRunConfig -> pre-flight
(fails here, before any worker starts) -> the evaluation on the Ray worker group (or in this
process with transformers) -> eval.json, the heatmap, W&B and a console table.

`run_eval(cfg)` is the same without Hydra (tests call it).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import hydra
from omegaconf import DictConfig

from longtrain.config.errors import ConfigError
from longtrain.config.eval_schema import EvalRunConfig
from longtrain.eval.hf_backend import evaluate_transformers
from longtrain.eval.report import (EVAL_JSON, HEATMAP_PNG, grid_rows, plot_heatmap, render_table,
                                   summarize, wandb_metrics, write_json)
from longtrain.eval.runner import evaluate_rank
from longtrain.observability.log import configure_logging
from longtrain.observability.wandb_run import WandbRun
from longtrain.parallel.runtime import shutdown_parallel
from longtrain.planning.eval import EvalPlan, plan_eval
from longtrain_launch.cli import (EXIT_BAD_INPUT, AppRun, config_groups, unknown_key_problems,
                                  version_line)
from longtrain_launch.group import RankActor, ray_session, worker_group
from longtrain_launch.store import register_configs, to_eval_config

register_configs()
_RUN = AppRun("longtrain-eval")


class EvalWorker(RankActor):
    """One rank of the evaluation: joins the world, evaluates, returns the (identical on every
    rank) result."""

    def evaluate(self, init_method: str) -> dict[str, Any]:
        runtime = self.join(init_method)
        try:
            return evaluate_rank(self.cfg, runtime)
        finally:
            shutdown_parallel()


def _evaluate_on_ray(cfg: EvalRunConfig) -> dict[str, Any]:
    import ray

    with ray_session(cfg), worker_group(cfg, EvalWorker, cfg=cfg) as group:
        results = ray.get([w.evaluate.remote(group.init_method) for w in group.workers],
                          timeout=cfg.launcher.timeout_s)
    return results[0]


def run_plan(plan: EvalPlan) -> dict[str, Any]:
    """Evaluate a validated plan and write its outputs; returns the eval.json content plus
    where the outputs went (`json`, `heatmap`, `wandb_dir`)."""
    cfg = plan.cfg
    started = time.perf_counter()
    if cfg.eval.backend == "transformers":
        result = evaluate_transformers(cfg)
    else:
        result = _evaluate_on_ray(cfg)
    summary = summarize(result, cfg=cfg, wall_time_s=time.perf_counter() - started)
    json_path = os.path.join(cfg.output_dir, EVAL_JSON)
    png_path = os.path.join(cfg.output_dir, HEATMAP_PNG)
    plot_heatmap(summary, png_path)
    write_json(summary, json_path)
    metrics = wandb_metrics(summary)
    run = WandbRun(cfg.logging.wandb, config=dataclasses.asdict(cfg), output_dir=cfg.output_dir,
                   environ=os.environ)
    run.log_results(metrics, images={"eval/needle_heatmap": png_path},
                    tables={"eval/accuracy_grid": grid_rows(summary)})
    run.finish(metrics)
    return {**summary, "json": json_path, "heatmap": png_path, "wandb_dir": run.directory,
            "wandb_mode": run.mode}


def run_eval(cfg: EvalRunConfig) -> dict[str, Any]:
    """Validate (ConfigError naming every problem), evaluate and write the outputs."""
    return run_plan(plan_eval(cfg))


@hydra.main(version_base="1.3", config_path="pkg://longtrain_conf", config_name="eval")
def _app(dcfg: DictConfig) -> dict[str, Any]:
    _RUN.started()

    try:
        plan = plan_eval(to_eval_config(dcfg))
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"longtrain-eval: {exc}", file=sys.stderr)
        sys.exit(2)
    cfg = plan.cfg
    configure_logging(log_file=os.path.join(cfg.output_dir, "driver.log"), console=False)
    for warning in plan.warnings:
        print(f"longtrain-eval: warning: {warning}", file=sys.stderr, flush=True)
    ev, p = cfg.eval, cfg.parallel
    where = ("transformers, 1 process" if ev.backend == "transformers" else
             f"attention={cfg.attention.backend}, world {p.world_size} (tp {p.tp}, cp {p.cp})")
    print(f"longtrain-eval: {plan.model.name} ({cfg.checkpoint}), {ev.task} at lengths "
          f"{list(ev.lengths)} x depths {list(ev.depths)}, {ev.samples} per cell, {where} "
          f"-> {cfg.output_dir}", flush=True)
    result = run_plan(plan)
    lines = [render_table(result), f"  results        {result['json']}",
             f"  heatmap        {result['heatmap']}"]
    if result["wandb_dir"]:
        lines.append(f"  W&B run        {result['wandb_dir']} ({result['wandb_mode']})")
    lines.append(f"  wall time      {result['wall_time_s']:.1f} s")
    print("\n".join(lines), flush=True)
    return result


def main() -> None:
    if "--version" in sys.argv[1:]:
        print(version_line("longtrain-eval"))
        return
    unknown = unknown_key_problems(sys.argv[1:], schema=EvalRunConfig,
                                   groups=config_groups() | {"eval"})
    if unknown:
        print(f"longtrain-eval: invalid configuration ({len(unknown)} problem(s)):\n"
              + "\n".join(f"  - {p}" for p in unknown), file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    _RUN(_app)


if __name__ == "__main__":
    main()
