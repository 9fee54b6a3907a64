"""Submitting to Slurm: `hydra/launcher=slurm` (hydra-submitit-launcher, on the login node).

Before anything reaches sbatch, every job of the sweep is composed as the job itself will
compose it and checked: the run's own constraints (`longtrain.planning.validate.problems`) and
its fit to the job's resources (the `hydra.launcher.*` fields, checked by the same
`fit_launcher` the job runs). One bad job submits nothing: every problem of every job is
printed and the command exits 2. `--check` runs the same checks and then the usual report of
each run, here, and never submits.

Resources left unset are derived from the run's layout (`job_resources`): one task per node,
`nodes` = the GPUs the ranks need / `gpus_per_node` (1 without GPUs), and `cpus_per_task` =
`launcher.cpus_per_worker` x the ranks on a task. Jobs of a sweep whose layouts differ get
different resources, so they are submitted as one Slurm array per distinct shape.

In the job, a run that raised fails its Slurm task (exit 1): `sacct` and `--mail-type=FAIL`
see FAILED (hydra-submitit-launcher alone records COMPLETED, facebookresearch/hydra#1928),
and submitit's result file still carries the error back to the submitting command, which
prints one line per job when they have ended.
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from longtrain.config.errors import ConfigError
from longtrain.config.schema import RunConfig
from longtrain.observability.progress import summary_line
from longtrain.planning.resolve import resolve
from longtrain.planning.validate import problems
from longtrain_launch.cli import EXIT_BAD_INPUT, EXIT_FAILED
from longtrain_launch.slurm import Allocation, fit_launcher, one_task_per_gpu_node
from longtrain_launch.store import to_run_config

# Hydra instantiates launchers only from the `hydra_plugins` namespace, by their registered
# name; `register_slurm_launcher` registers LongtrainSlurmLauncher under this one (the class
# itself lives here, where the job's unpickling finds it).
LAUNCHER_NAME = "hydra_plugins.longtrain.LongtrainSlurmLauncher"
# the structured base of conf/longtrain_conf/hydra/launcher/slurm.yaml
BASE_CONFIG = "longtrain_submitit_slurm"


@dataclass
class LongtrainSlurmConf(SlurmQueueConf):
    _target_: str = LAUNCHER_NAME
    # unset (null): derived from the run's layout, see `job_resources`
    nodes: Optional[int] = None  # type: ignore[assignment]
    tasks_per_node: Optional[int] = None  # type: ignore[assignment]
    # set by `longtrain-train --check`: check every job here, submit nothing
    check_only: bool = False


def register_slurm_launcher(*, on_submit: Optional[Callable[[], None]] = None) -> None:
    """Make `hydra/launcher=slurm` available: its structured base config and its launcher
    class (idempotent; called by `longtrain-train` before Hydra composes, and in the job).
    `on_submit` is called once every job has passed its checks, before sbatch (the app's
    cue that what follows is the runs' outcome, no longer a bad command line)."""
    ConfigStore.instance().store(group="hydra/launcher", name=BASE_CONFIG,
                                 node=LongtrainSlurmConf, provider="longtrain")
    Plugins.instance().class_name_to_class[LAUNCHER_NAME] = LongtrainSlurmLauncher
    if on_submit is not None:
        LongtrainSlurmLauncher.on_submit = on_submit


@dataclass(frozen=True)
class JobResources:
    """One job's shape, as sbatch gets it."""

    nodes: int
    tasks_per_node: int
    cpus_per_task: int
    # 0: no GPUs requested
    gpus_per_node: int

    def as_params(self) -> dict[str, Any]:
        return {"nodes": self.nodes, "tasks_per_node": self.tasks_per_node,
                "cpus_per_task": self.cpus_per_task,
                "gpus_per_node": self.gpus_per_node or None}

    def describe(self) -> str:
        gpus = f", {self.gpus_per_node} GPU(s) per node" if self.gpus_per_node else ""
        return (f"{self.nodes} node(s) x {self.tasks_per_node} task(s), "
                f"{self.cpus_per_task} CPU(s) per task{gpus}")


def job_resources(params: dict[str, Any], cfg: RunConfig) -> tuple[JobResources, list[str]]:
    """The job's resources for run `cfg`: the `hydra.launcher.*` fields in `params` that are
    set, the others derived from the layout; and every reason the run would not fit them
    (the checks the job itself makes in `fit_launcher`, and resources left idle)."""
    world = cfg.parallel.world_size
    gpus = int(params.get("gpus_per_node") or 0)
    tasks_per_node = int(params.get("tasks_per_node") or 1)
    gpus_per_rank = (cfg.launcher.gpus_per_worker or 1) if gpus else 0
    nodes = params.get("nodes")
    if nodes is None:
        nodes = max(1, math.ceil(world * gpus_per_rank / gpus)) if gpus else 1
    nodes = int(nodes)
    num_tasks = nodes * tasks_per_node
    ranks_per_task = math.ceil(world / num_tasks)
    cpus = params.get("cpus_per_task")
    if cpus is None:
        cpus = ranks_per_task * max(1, cfg.launcher.cpus_per_worker)
    resources = JobResources(nodes=nodes, tasks_per_node=tasks_per_node, cpus_per_task=int(cpus),
                             gpus_per_node=gpus)

    found = []
    if cfg.launcher.kind != "local":
        found.append(f"launcher.kind={cfg.launcher.kind} with hydra/launcher=slurm: the job "
                     "starts its own Ray cluster over the allocation; drop the launcher "
                     "override (launcher.kind=local)")
    problem = one_task_per_gpu_node(tasks_per_node, gpus)
    if problem:
        found.append(problem)
    alloc = Allocation(job_id="", rank=0, num_tasks=num_tasks, num_nodes=nodes,
                       cpus_per_task=resources.cpus_per_task, gpus_per_task=gpus, folder="",
                       restart=0)
    try:
        fit_launcher(cfg.launcher, world_size=world, alloc=alloc)
    except ValueError as exc:
        found.append(str(exc))
    if num_tasks > world:
        found.append(f"hydra.launcher.nodes={nodes} x tasks_per_node={tasks_per_node} = "
                     f"{num_tasks} tasks for parallel.world_size={world}: "
                     f"{num_tasks - world} would hold no rank")
    elif gpus and nodes * gpus > world * gpus_per_rank:
        found.append(f"hydra.launcher.nodes={nodes} x gpus_per_node={gpus} = {nodes * gpus} "
                     f"GPUs for parallel.world_size={world} x {gpus_per_rank} GPU(s) per rank: "
                     f"{nodes * gpus - world * gpus_per_rank} would sit idle "
                     f"(set parallel.world_size={nodes * gpus // gpus_per_rank} "
                     f"or hydra.launcher.nodes={math.ceil(world * gpus_per_rank / gpus)})")
    return resources, found


def run_problems(task_cfg: DictConfig) -> tuple[Optional[RunConfig], list[str]]:
    """The typed run config of one job and every constraint it violates (as `--check` and the
    job's own validation see them); (None, [error]) when it cannot even be built."""
    try:
        cfg = resolve(to_run_config(task_cfg))
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        return None, [str(exc)]
    return cfg, problems(cfg)


@dataclass
class _Job:
    num: int
    overrides: list[str]
    run_dir: str
    resources: Optional[JobResources]
    problems: list[str]

    @property
    def label(self) -> str:
        return f"#{self.num} ({' '.join(filter_overrides(self.overrides)) or 'no overrides'})"


class _TaskByName:
    """The task function, pickled as its module and name. `@hydra.main` leaves its decorated
    wrapper under the function's name, so cloudpickle would copy the function by value, with
    every module global it uses (some cannot be pickled); the job imports it instead."""

    def __init__(self, fn: Callable[[DictConfig], Any]) -> None:
        self.module, self.name = fn.__module__, fn.__qualname__

    def __call__(self, cfg: DictConfig) -> Any:
        found = getattr(importlib.import_module(self.module), self.name)
        return getattr(found, "__wrapped__", found)(cfg)


class LongtrainSlurmLauncher(SlurmLauncher):
    """hydra-submitit-launcher's Slurm launcher that checks every job before submitting,
    derives unset resources, reports job ids, paths and outcomes, and fails failed jobs."""

    # see register_slurm_launcher
    on_submit: Optional[Callable[[], None]] = None

    def __init__(self, **params: Any) -> None:
        self.check_only = bool(params.pop("check_only", False))
        super().__init__(**params)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        if "<locals>" not in task_function.__qualname__:
            task_function = _TaskByName(task_function)
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def _plan(self, overrides: list[str], num: int) -> _Job:
        assert self.hydra_context is not None and self.config is not None
        try:
            sweep = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        # Hydra's own errors (a bad override, an interpolation): reported with the others
        except Exception as exc:
            return _Job(num, overrides, "", None, [_first_line(exc)])
        with open_dict(sweep.hydra):
            sweep.hydra.job.num = num
            run_dir = os.path.abspath(os.path.join(str(sweep.hydra.sweep.dir),
                                                   str(sweep.hydra.sweep.subdir)))
            # what the job's run sets: `${hydra:runtime.output_dir}` resolves to its run dir
            sweep.hydra.runtime.output_dir = run_dir
        submitting = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(sweep)
        try:
            task_cfg = copy.deepcopy(sweep)
            with read_write(task_cfg), open_dict(task_cfg):
                del task_cfg["hydra"]
            cfg, found = run_problems(task_cfg)
        except Exception as exc:
            return _Job(num, overrides, run_dir, None, [_first_line(exc)])
        finally:
            HydraConfig.instance().cfg = submitting
        resources = None
        if cfg is not None:
            # this job's own launcher fields: a sweep may vary them
            launcher = OmegaConf.to_container(sweep.hydra.launcher, resolve=True)
            resources, more = job_resources(launcher, cfg)
            found += more
        return _Job(num, overrides, run_dir, resources, found)

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        jobs = [self._plan(list(o), initial_job_idx + i) for i, o in enumerate(job_overrides)]
        bad = [job for job in jobs if job.problems]
        if bad:
            print(f"longtrain-train: {len(bad)} of {len(jobs)} job(s) would fail"
                  f"{'' if self.check_only else '; nothing submitted to Slurm'}:",
                  file=sys.stderr)
            for job in bad:
                print(f"  job {job.label}:", file=sys.stderr)
                for problem in job.problems:
                    print(f"    - {problem}", file=sys.stderr)
            sys.stderr.flush()
            sys.exit(EXIT_BAD_INPUT)
        if self.check_only:
            return [self._check(job) for job in jobs]
        if self.on_submit is not None:
            self.on_submit()
        return self._submit(jobs)

    def _check(self, job: _Job) -> JobReturn:
        """--check: the job's resources, then the task function's report, run here."""
        assert self.hydra_context is not None and self.config is not None
        assert self.task_function is not None and job.resources is not None
        print(f"longtrain-train --check: job {job.label} would get {job.resources.describe()}",
              flush=True)
        sweep = self.hydra_context.config_loader.load_sweep_config(self.config, job.overrides)
        with open_dict(sweep):
            sweep.hydra.job.id = f"check_{job.num}"
            sweep.hydra.job.num = job.num
        HydraConfig.instance().set_config(sweep)
        return run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                       config=sweep, job_dir_key="hydra.sweep.dir",
                       job_subdir_key="hydra.sweep.subdir")

    def _submit(self, jobs: list[_Job]) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR,
                                         folder=self.params["submitit_folder"],
                                         slurm_max_num_timeout=self.params["max_num_timeout"])
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        params = {k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items()
                  if k not in ("submitit_folder", "max_num_timeout")}
        sweep_dir = str(self.config.hydra.sweep.dir)
        os.makedirs(sweep_dir, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))

        shapes: dict[JobResources, list[_Job]] = {}
        for job in jobs:
            assert job.resources is not None
            shapes.setdefault(job.resources, []).append(job)
        submitted = []
        for resources, group in shapes.items():
            executor.update_parameters(**{**params, **resources.as_params()})
            args = [(job.overrides, "hydra.sweep.dir", job.num, f"job_id_for_{job.num}",
                     Singleton.get_state()) for job in group]
            for job, handle in zip(group, executor.map_array(self, *zip(*args))):
                print(f"longtrain: submitted Slurm job {handle.job_id} for {job.label}: "
                      f"{resources.describe()}\n  run dir {job.run_dir}\n"
                      f"  logs    {handle.paths.stdout} {handle.paths.stderr}", flush=True)
                submitted.append((job, handle))

        returns, failed = [], 0
        for job, handle in submitted:
            try:
                ret = handle.results()[0]
                line = _summary(ret.return_value)
            except Exception as exc:
                failed += 1
                ret = None
                line = f"FAILED: {_error_line(str(exc))} (see {handle.paths.stderr})"
            print(f"longtrain: job {handle.job_id} {job.label}: {line}", flush=True)
            returns.append(ret)
        if failed:
            print(f"longtrain-train: {failed} of {len(submitted)} Slurm job(s) failed",
                  file=sys.stderr, flush=True)
            sys.exit(EXIT_FAILED)
        return returns

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        # in the job: the run's exception, raised, fails the Slurm task (exit 1), and
        # submitit pickles it for the submitting command
        register_slurm_launcher()
        ret = super().__call__(*args, **kwargs)
        if ret.status == JobStatus.FAILED:
            raise ret._return_value
        return ret


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def _error_line(text: str) -> str:
    """The exception in one line, from submitit's report of a failed job (its traceback
    between lines of dashes, then where the logs are): the last unindented line of the
    traceback with its continuation lines, the exception's module dropped."""
    blocks = re.split(r"^-{5,}$", text, flags=re.M)
    trace = blocks[1] if len(blocks) >= 3 else text
    lines = [line for line in trace.strip().splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if not line[0].isspace()
              and not line.startswith(("Traceback", "During handling", "The above exception"))]
    if not starts:
        return lines[-1].strip() if lines else text.strip()
    first = lines[starts[-1]]
    head, sep, rest = first.partition(": ")
    first = head.rsplit(".", 1)[-1] + sep + rest if " " not in head else first
    return " ".join([first, *(line.strip() for line in lines[starts[-1] + 1:])])


def _summary(result: Any) -> str:
    if isinstance(result, dict) and "loss_end_mean" in result:
        return summary_line(result)
    return f"done ({result})"
