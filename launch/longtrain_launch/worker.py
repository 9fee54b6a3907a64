"""One Ray actor per training rank: joins torch.distributed, trains (resuming from a
checkpoint when there is one), streams metrics to the driver, exports the final weights.

The class is plain Python; the driver wraps it with `ray.remote` so importing this module
needs no Ray.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any, Iterator

from longtrain.checkpoint.hf import export_hf
from longtrain.checkpoint.inference_files import inference_files
from longtrain.observability.log import get_logger
from longtrain.parallel.runtime import shutdown_parallel
from longtrain.train.loop import TrainState, train
from longtrain_launch.group import RankActor


class Worker(RankActor):
    # the stop request arrives while `stream` / `run` is still running
    max_concurrency = 2

    def __init__(self, *, rank: int, cfg) -> None:
        super().__init__(rank=rank, cfg=cfg)
        self._stop = threading.Event()

    def request_stop(self) -> None:
        """Save a checkpoint after the current step and stop (every rank agrees on the step)."""
        self._stop.set()

    def _steps(self, init_method: str) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        log = get_logger()
        log.info("worker pid %d on %s", os.getpid(), socket.gethostname())
        runtime = self.join(init_method)
        try:
            state = TrainState.create(cfg, runtime)
            state.stop_requested = self._stop
            model = state.model
            if state.resumed_from:
                log.info("continuing at step %d from %s", state.step, state.resumed_from)
            for metrics in train(cfg, runtime, state=state):
                if metrics["step"] % cfg.logging.every == 0 or metrics["step"] == cfg.train.steps:
                    log.info("step %d loss %.4f lr %.2e tok/s %.0f", metrics["step"],
                             metrics["loss"], metrics["lr"], metrics["tokens_per_s"])
                    yield metrics
            # a schedule stage may have rebuilt the mesh
            runtime = state.runtime
            if cfg.train.save_hf and not state.stopped and runtime.dp_rank == 0 \
                    and runtime.cp_rank == 0:
                out = os.path.join(cfg.output_dir, "hf")
                writer = runtime.tp_rank == 0
                export_hf(model, cfg.rope, out, tp_group=runtime.tp_group, is_writer=writer,
                          inference=inference_files(cfg.data.tokenizer) if writer else None)
                log.info("exported Hugging Face weights to %s", out)
        finally:
            shutdown_parallel()

    def stream(self, init_method: str) -> Iterator[dict[str, Any]]:
        """Rank 0: every logged step's metrics, as they happen."""
        yield from self._steps(init_method)

    def run(self, init_method: str) -> int:
        """Other ranks: train to the end; returns the number of steps done."""
        last = 0
        for metrics in self._steps(init_method):
            last = metrics["step"]
        return last
