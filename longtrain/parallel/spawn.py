"""Run a function on N local processes joined by gloo: the harness for distributed tests
and CPU benchmarks.

Every process initializes through a `file://` store in a fresh temporary directory, calls
`fn(runtime, *args)`, and always tears its groups down. A failure on any rank is raised in
the caller with that rank's traceback.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.runtime import init_parallel, shutdown_parallel


def _entry(rank: int, fn: Callable[..., Any], dims: ParallelDims, store: str, args: tuple,
           errors: Any, threads: int, backend: str, cp_sizes: tuple[int, int] | None,
           timeout_s: int) -> None:
    torch.set_num_threads(threads)
    # Local processes only: keep gloo's pair connections on loopback.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        runtime = init_parallel(dims, rank=rank, init_method=f"file://{store}", backend=backend,
                                timeout_s=timeout_s, cp_sizes=cp_sizes)
        try:
            fn(runtime, *args)
        finally:
            shutdown_parallel()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise


def run_distributed(fn: Callable[..., Any], *, world_size: int, tp: int = 1, cp: int = 1,
                    args: tuple = (), threads: int = 1, backend: str = "gloo",
                    cp_sizes: tuple[int, int] | None = None, timeout_s: int = 300) -> None:
    """Spawn `world_size` processes running `fn(runtime, *args)`; raise on any failure.

    `fn` must be a module-level function (it is pickled into the children). backend="nccl"
    puts rank r on GPU r. `cp_sizes=(ulysses, ring)` also builds the 2-D CP sub-groups.
    """
    dims = ParallelDims(world_size=world_size, tp=tp, cp=cp)
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="longtrain-dist-") as tmp:
        store = os.path.join(tmp, "store")
        try:
            mp.start_processes(_entry,
                               args=(fn, dims, store, args, errors, threads, backend, cp_sizes,
                                     timeout_s),
                               nprocs=world_size, join=True, start_method="spawn")
        except mp.ProcessRaisedException as exc:
            details = []
            while not errors.empty():
                rank, tb = errors.get()
                details.append(f"--- rank {rank} ---\n{tb}")
            raise RuntimeError("distributed run failed:\n" + "\n".join(details)) from exc
