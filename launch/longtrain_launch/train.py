"""`longtrain-train`: the Hydra app. Compose conf/ -> typed RunConfig -> pre-flight
validation (fails here, before any worker starts) -> Ray worker group."""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable

import hydra
from omegaconf import DictConfig

from longtrain.checkpoint.native import choose_resume, list_checkpoints
from longtrain.checkpoint.source import tokenizer_warnings
from longtrain.config.errors import ConfigError
from longtrain.config.schema import RunConfig
from longtrain.data.prepare import describe_data, prepare_data
from longtrain.memory.estimate import Policy
from longtrain.observability.log import configure_logging
from longtrain.observability.progress import render_summary
from longtrain.planning.memory import choose, over_budget_warning
from longtrain.planning.preflight import (EXIT_NO_FIT, check_report, describe_init_and_rope,
                                          rope_warnings)
from longtrain.planning.resolve import resolve
from longtrain.planning.validate import problems, validate
from longtrain_launch.cli import (EXIT_BAD_INPUT, AppRun, config_groups, nothing_written,
                                  unknown_key_problems, version_line)
from longtrain_launch.driver import run
from longtrain_launch.slurm import Allocation, run_in_allocation
from longtrain_launch.slurm_submit import register_slurm_launcher
from longtrain_launch.store import register_configs, to_run_config

register_configs()
_RUN = AppRun("longtrain-train")


def prepare(dcfg: DictConfig):
    """Typed, checkpoint-resolved, validated config with its data prepared (a corpus is
    tokenized and packed here, on the driver); raises ConfigError on bad input."""
    cfg = resolve(to_run_config(dcfg))
    validate(cfg)
    if cfg.memory.auto:
        try:
            cfg, report = choose(cfg)
        except ValueError as exc:
            raise ConfigError([str(exc)]) from exc
        print(report, flush=True)
    else:
        warning = over_budget_warning(cfg)
        if warning:
            print(f"longtrain-train: warning: {warning}", file=sys.stderr, flush=True)
    return prepare_data(cfg)


@hydra.main(version_base="1.3", config_path="pkg://longtrain_conf", config_name="config")
def _app(dcfg: DictConfig) -> dict[str, Any]:
    """The task of `longtrain-train`: train (here, or as a task of a Slurm job)."""
    return _run_task(dcfg, check_only=False)


@hydra.main(version_base="1.3", config_path="pkg://longtrain_conf", config_name="config")
def _app_check(dcfg: DictConfig) -> dict[str, Any]:
    """The task of `longtrain-train --check`: report, start nothing."""
    return _run_task(dcfg, check_only=True)


def _run_task(dcfg: DictConfig, *, check_only: bool) -> dict[str, Any]:
    _RUN.started()
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.runtime.choices.get("hydra/launcher") == "slurm" \
            and hydra_cfg.mode == RunMode.RUN:
        # without -m Hydra ignores its launcher: this would train here, e.g. on a login node
        print("longtrain-train: hydra/launcher=slurm submits in multirun mode only: add -m",
              file=sys.stderr)
        sys.exit(2)
    if check_only:
        return _check(dcfg)
    # the task owns the process: the one place it reads submitit's and Slurm's environment
    allocation = Allocation.detect(os.environ)
    if allocation is None:
        return _train(dcfg)
    # a task of a job submitted by hydra/launcher=slurm: rank 0 drives, the others host Ray
    return run_in_allocation(allocation, lambda adapt: _train(dcfg, adapt=adapt, in_job=True),
                             launcher_kind=dcfg.launcher.kind)


def _train(dcfg: DictConfig, *, adapt: Callable[[RunConfig], RunConfig] | None = None,
           in_job: bool = False) -> dict[str, Any]:
    try:
        cfg = prepare(dcfg)
        if adapt is not None:
            cfg = adapt(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"longtrain-train: {exc}", file=sys.stderr)
        if in_job:
            # raised, the error reaches submitit's result and the submitting command; an exit
            # would leave no result to wait for
            raise
        sys.exit(2)
    configure_logging(log_file=os.path.join(cfg.output_dir, "driver.log"), console=False)
    data_line = describe_data(cfg)
    if data_line:
        print(f"longtrain: {data_line}", flush=True)

    # resolved once here, so every worker continues from the same checkpoint
    choice = choose_resume(cfg.checkpoint.resume, checkpoint_dir=cfg.checkpoint_dir)
    resume = choice.path
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint,
                                                                  resume=resume or "never"))
    # a damaged newer checkpoint is passed over: say which and why, where the user looks
    for line in choice.skipped_lines():
        print(f"longtrain-train: warning: {line}", file=sys.stderr, flush=True)
    if resume:
        print(f"longtrain: resuming from {resume}", flush=True)
    memory = Policy(cfg.memory.activations, cfg.memory.checkpointing, cfg.memory.offload).name
    print(f"longtrain: {cfg.model.name} model, attention={cfg.attention.backend}, "
          f"world {cfg.parallel.world_size} (tp {cfg.parallel.tp}, cp {cfg.parallel.cp}), "
          f"seq_len {cfg.data.seq_len}, {cfg.train.steps} steps"
          f"{'' if memory == 'none' else f', memory {memory}'} -> {cfg.output_dir}", flush=True)
    print(f"longtrain: {describe_init_and_rope(cfg)}", flush=True)
    for warning in [*rope_warnings(cfg), *tokenizer_warnings(cfg)]:
        print(f"longtrain-train: warning: {warning}", file=sys.stderr, flush=True)
    where = ("an embedded Ray" if cfg.launcher.kind == "local"
             else f"the Ray cluster at {cfg.launcher.address}")
    print(f"longtrain: starting {cfg.parallel.world_size} worker(s) on {where}; step 1 comes "
          f"after the model build and a GEMM peak measurement", flush=True)
    try:
        skipped = choice.skipped_lines()
        alert = "; ".join(skipped) + f"; resuming from {resume or 'the start'}"
        result = run(cfg, alerts=[("damaged checkpoint skipped", alert)] if skipped else ())
    except ConfigError as exc:
        print(f"longtrain-train: {exc}", file=sys.stderr)
        if in_job:
            raise
        sys.exit(2)
    if result.get("stopped_at"):
        saved = list_checkpoints(cfg.checkpoint_dir)
        where = saved[-1][1] if saved else cfg.checkpoint_dir
        print(f"longtrain: stopped at step {result['stopped_at']} on "
              f"{result.get('stop_signal', 'a signal')}, checkpoint saved in {where}; run the "
              f"same command to resume (checkpoint.resume=auto)", flush=True)
    extra = {"output": result["output_dir"]}
    if result.get("wandb_dir"):
        extra["W&B run"] = f"{result['wandb_dir']} ({result.get('wandb_mode')})"
    if result.get("hf_dir"):
        extra["HF weights"] = result["hf_dir"]
    print(render_summary(result, extra=extra), flush=True)
    if result.get("exit_code") and not in_job:
        # a clean stop on a signal: 128 + signal (130 for Ctrl-C, 143 for SIGTERM)
        sys.exit(result["exit_code"])
    return result


def _check(dcfg: DictConfig) -> dict[str, Any]:
    """--check: print the layout, attention per layer, memory estimate and every violated
    constraint; start nothing. Exits 2 when a constraint fails."""
    try:
        cfg = resolve(to_run_config(dcfg))
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"longtrain-train --check: {exc}", file=sys.stderr)
        sys.exit(2)
    if cfg.memory.auto:
        if not problems(cfg):
            try:
                cfg, report = choose(cfg)
                print(report)
            except ValueError as exc:
                print(f"longtrain-train --check: {exc}", file=sys.stderr)
                sys.exit(2)
    report, found, fits = check_report(cfg)
    print(report, flush=True)
    if found:
        sys.exit(EXIT_BAD_INPUT)
    if not fits:
        sys.exit(EXIT_NO_FIT)
    return {"checked": True}


def _check_here(args: list[str]) -> list[str]:
    """--check never submits. With `-m hydra/launcher=slurm`, the launcher checks every job
    of the sweep, its `hydra.launcher.*` resources included, and runs each job's report here
    (`hydra.launcher.check_only=true`). Other launcher settings are dropped, so the runs are
    checked here by the default launcher (a submitted job would not know it was meant to
    check, and would train)."""
    multirun = any(a in ("-m", "--multirun") for a in args)
    if multirun and "hydra/launcher=slurm" in args:
        launcher = [a for a in args if a.lstrip("+~").startswith(("hydra/launcher=",
                                                                   "hydra.launcher."))]
        print(f"longtrain-train --check: checking here instead of submitting, each job with "
              f"its Slurm resources ({' '.join(launcher)})", file=sys.stderr)
        return [*args, "hydra.launcher.check_only=true"]
    dropped = [a for a in args if a.lstrip("+~").startswith(("hydra/launcher=", "hydra.launcher."))]
    if dropped:
        print(f"longtrain-train --check: checking here instead of submitting (ignored: "
              f"{' '.join(dropped)})", file=sys.stderr)
    return [a for a in args if a not in dropped]


def main() -> None:
    if "--version" in sys.argv[1:]:
        print(version_line("longtrain-train"))
        return
    unknown = unknown_key_problems(sys.argv[1:], schema=RunConfig, groups=config_groups())
    if unknown:
        print(f"longtrain-train: invalid configuration ({len(unknown)} problem(s)):\n"
              + "\n".join(f"  - {p}" for p in unknown), file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    if "--check" in sys.argv[1:]:
        sys.argv.remove("--check")
        sys.argv[1:] = _check_here(sys.argv[1:])
        with nothing_written(sys.argv[1:]) as args:
            sys.argv[1:] = args
            _prepare_launchers()
            _RUN(_app_check)
        return
    _prepare_launchers()
    _RUN(_app)


def _prepare_launchers() -> None:
    # hydra/launcher=slurm: submitit's warning signal is USR1 (its default is USR2), the one the
    # driver checkpoints on; read when submitit is imported, here and in the job it submits
    os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")

    # a sweep that passed its checks and was submitted has started: a failed job exits 1
    register_slurm_launcher(on_submit=_RUN.started)


if __name__ == "__main__":
    main()
