"""One Ray actor per rank: joins torch.distributed, trains, streams metrics to the driver.

The class is plain Python; the driver wraps it with `ray.remote` so importing this module
needs no Ray.
"""

from __future__ import annotations

import os
import socket
import warnings
from typing import Any, Iterator

from longtrain.config.schema import RunConfig


def _quiet_third_party() -> None:
    # megatron-core warns at import that Transformer Engine / Apex are absent: expected here.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


class Worker:
    def __init__(self, *, rank: int, cfg: RunConfig) -> None:
        from longtrain.observability.log import configure_logging

        _quiet_third_party()
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

    def _steps(self, init_method: str) -> Iterator[dict[str, Any]]:
        import torch

        from longtrain.attention.ulysses import hierarchical_cp_sizes
        from longtrain.observability.log import get_logger
        from longtrain.parallel.dims import ParallelDims
        from longtrain.parallel.runtime import init_parallel, shutdown_parallel
        from longtrain.train.loop import TrainState, train

        cfg = self.cfg
        torch.set_num_threads(max(1, cfg.launcher.cpus_per_worker))
        dims = ParallelDims.from_config(cfg.parallel)
        cp_sizes = hierarchical_cp_sizes(cfg.attention.backend, cfg.attention.ulysses_degree,
                                         cfg.parallel.cp)
        runtime = init_parallel(dims, rank=self.rank, init_method=init_method,
                                backend=cfg.parallel.backend, timeout_s=cfg.parallel.timeout_s,
                                cp_sizes=cp_sizes)
        log = get_logger()
        try:
            state = TrainState.create(cfg, runtime)
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
            if cfg.train.save_hf and runtime.dp_rank == 0 and runtime.cp_rank == 0:
                from longtrain.checkpoint.hf import export_hf

                out = os.path.join(cfg.output_dir, "hf")
                export_hf(model, cfg.rope, out, tp_group=runtime.tp_group,
                          is_writer=runtime.tp_rank == 0)
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

