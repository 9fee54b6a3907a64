"""The training driver: the Ray worker group (`group.py`: one actor per rank, clean teardown
on every exit path) with metrics streamed from rank 0 to the console and W&B.

Failures: when a worker dies or a step fails in a collective (a hung or dead peer, see
`longtrain.parallel.watch`), the whole group is torn down and started again from the newest
checkpoint, up to `launcher.max_restarts` times; errors a restart cannot fix (a bad config,
a parity failure) end the run at once. On SIGTERM or SIGUSR1 (Slurm's warning before
preemption or the time limit) every rank saves a checkpoint after the same step and stops;
under submitit the job is then requeued and the requeued job resumes the same run, W&B run
id included.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from typing import Any, Optional, Sequence

from longtrain.attention.canary import ParityError
from longtrain.checkpoint.native import resolve_resume
from longtrain.config.schema import RunConfig
from longtrain.observability.log import get_logger
from longtrain.observability.progress import Progress, RunSummary
from longtrain.observability.wandb_run import WandbRun
from longtrain_launch.group import init_ray, worker_group
from longtrain_launch.worker import Worker

# How often the driver looks at the workers while waiting for the next metrics.
_POLL_S = 1.0
# Worker-side errors a restart cannot fix: the same config fails the same way again.
_PERMANENT = (ValueError, TypeError, KeyError, AssertionError, NotImplementedError)


class _StopSignals:
    """SIGTERM / SIGUSR1 / SIGINT -> a flag the driver loop turns into a stop request to the
    workers: they checkpoint after the current step and stop. A second SIGINT (Ctrl-C twice)
    aborts at once with KeyboardInterrupt.

    Built before Ray starts (Ray's driver installs its own SIGTERM exit), so `previous` holds
    the handlers of whoever ran us: submitit's requeue under Slurm, the default otherwise.
    `forward()` hands the signal to those after the checkpoint. Ray starts its own processes
    with SIGINT blocked, so a Ctrl-C on the terminal reaches only this driver."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self.previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        self.installed = False

    def __enter__(self) -> "_StopSignals":
        try:
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)
            self.installed = True
        except ValueError:
            # not the main thread (a caller running us in a thread): no handlers
            pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            return
        get_logger().warning("received %s: checkpointing and stopping", name)
        hint = " (Ctrl-C again aborts without it)" if signum == signal.SIGINT else ""
        print(f"\nlongtrain: {name}: saving a checkpoint after the current step, then "
              f"stopping{hint}", file=sys.stderr, flush=True)
        self.received = signum

    def __exit__(self, *_exc: Any) -> None:
        if self.installed:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def forward(self) -> None:
        """After the checkpoint: run the handler that was there before us, if it is Python
        code (submitit requeues the job and exits); the default action is not re-raised, nor
        Python's own KeyboardInterrupt."""
        handler = self.previous.get(self.received) if self.received else None
        if callable(handler) and handler is not signal.default_int_handler:
            handler(self.received, None)


class Reporter:
    """Rank 0's metrics, as they arrive on the driver: into the run summary, the progress
    bar and W&B; the first non-finite loss raises a W&B alert (and a console line)."""

    def __init__(self, wandb_run: Any, progress: Progress,
                 summary: Optional[RunSummary] = None) -> None:
        self.wandb_run, self.progress = wandb_run, progress
        self.summary = summary if summary is not None else RunSummary()

    def __call__(self, metrics: dict[str, Any]) -> None:
        self.summary.add(metrics)
        self.progress.update(metrics)
        self.wandb_run.log(metrics, step=int(metrics["step"]))
        bad = self.summary.nonfinite_steps
        if len(bad) == 1 and bad[0] == int(metrics["step"]):
            message = (f"loss {float(metrics['loss'])} at step {metrics['step']} (grad norm "
                       f"{float(metrics['grad_norm'])}, lr {float(metrics['lr']):.3g}); later "
                       f"non-finite steps are counted in the summary, not alerted")
            get_logger().warning("non-finite %s", message)
            print(f"longtrain: non-finite {message}", file=sys.stderr, flush=True)
            self.wandb_run.alert("non-finite loss", message)


def _restartable(exc: BaseException) -> bool:
    import ray.exceptions as rex

    if isinstance(exc, (rex.RayActorError, rex.GetTimeoutError)):
        return True
    if isinstance(exc, rex.RayTaskError):
        cause = exc.cause
        return not isinstance(cause, _PERMANENT + (ParityError,))
    return False


def _run_group(cfg: RunConfig, *, on_metrics, stop: _StopSignals) -> None:
    """One attempt: start the group, stream rank 0's metrics, watch every rank; raises the
    first worker failure."""
    import ray

    with worker_group(cfg, Worker, cfg=cfg) as group:
        workers, init_method = group.workers, group.init_method
        others = {w.run.remote(init_method): rank for rank, w in enumerate(workers) if rank}
        stream = workers[0].stream.options(num_returns="streaming").remote(init_method)
        streaming, stop_sent = True, False
        while streaming or others:
            if stop.received and not stop_sent:
                ray.get([w.request_stop.remote() for w in workers], timeout=60)
                stop_sent = True
            waiting = ([stream] if streaming else []) + list(others)
            ready, _ = ray.wait(waiting, num_returns=1, timeout=_POLL_S)
            for ref in ready:
                if ref is stream:
                    try:
                        item = next(stream)
                    except StopIteration:
                        streaming = False
                        continue
                    on_metrics(ray.get(item, timeout=cfg.launcher.timeout_s))
                else:
                    ray.get(ref)
                    del others[ref]


def run(cfg: RunConfig, *, alerts: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """Train `cfg` on a Ray worker group, restarting it on failures; returns the summary.
    `alerts`: (title, text) of what the entry point found before the run (e.g. a damaged
    checkpoint it skipped), raised once as W&B alerts when the run starts."""
    log = get_logger()
    started = time.perf_counter()
    stop = _StopSignals()
    owns_ray = init_ray(cfg)
    progress = Progress(total=cfg.train.steps, enabled=cfg.logging.progress)
    summary = RunSummary()
    wandb_run = None
    stopped_at: list[int] = []
    restarts = 0

    def on_metrics(metrics: dict[str, Any]) -> None:
        reporter(metrics)
        if metrics.get("stopped"):
            stopped_at.append(int(metrics["step"]))

    attempt = cfg
    try:
        # W&B's own environment (WANDB_PROJECT, WANDB_DIR, ...) fills what the config leaves unset
        wandb_run = WandbRun(cfg.logging.wandb, config=dataclasses.asdict(cfg),
                             output_dir=cfg.output_dir, environ=os.environ)
        for title, text in alerts:
            wandb_run.alert(title, text)
        reporter = Reporter(wandb_run, progress, summary)
        with stop:
            while True:
                try:
                    _run_group(attempt, on_metrics=on_metrics, stop=stop)
                    break
                except Exception as exc:
                    if stop.received or not _restartable(exc) \
                            or restarts >= cfg.launcher.max_restarts:
                        raise
                    restarts += 1
                    resume = resolve_resume("auto", checkpoint_dir=cfg.checkpoint_dir)
                    # before this run saved anything: where it started from
                    resume = resume or (cfg.checkpoint.resume
                                        if cfg.checkpoint.resume != "never" else None)
                    message = (f"worker group failed ({type(exc).__name__}: "
                               f"{str(exc).strip().splitlines()[-1][:300]}); restart "
                               f"{restarts}/{cfg.launcher.max_restarts} from "
                               f"{resume or 'the start'}")
                    log.warning(message)
                    print(f"longtrain: {message}", flush=True)
                    wandb_run.alert("worker group restarted", message)
                    attempt = dataclasses.replace(cfg, checkpoint=dataclasses.replace(
                        cfg.checkpoint, resume=resume or "never"))
            if stop.received:
                summary.wall_time_s = time.perf_counter() - started
                wandb_run.finish(summary.as_dict(), exit_code=0, preempted=True)
                wandb_run = None
                progress.close()
                stop.forward()
    except BaseException as exc:
        if wandb_run is not None:
            wandb_run.alert("run failed", f"{type(exc).__name__}: {exc}"[:1000])
            wandb_run.finish(summary.as_dict(), exit_code=1)
            wandb_run = None
        raise
    finally:
        progress.close()
        if owns_ray:
            import ray

            ray.shutdown()
    summary.wall_time_s = time.perf_counter() - started
    result = summary.as_dict()
    result["restarts"] = restarts
    if stopped_at:
        result["stopped_at"] = stopped_at[-1]
    if wandb_run is not None:
        wandb_run.finish(result)
        result["wandb_dir"] = wandb_run.directory
        result["wandb_mode"] = wandb_run.mode
    result["output_dir"] = cfg.output_dir
    if stop.received:
        result["stop_signal"] = signal.Signals(stop.received).name
        # the conventional 128 + signal: a clean, checkpointed stop, never a crash's 1
        result["exit_code"] = 128 + int(stop.received)
    if cfg.train.save_hf and not stopped_at:
        result["hf_dir"] = os.path.join(cfg.output_dir, "hf")
    return result
