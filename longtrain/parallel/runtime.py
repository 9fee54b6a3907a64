"""Process groups: torch.distributed + megatron-core parallel_state (TP x CP x DP)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from longtrain.parallel.dims import ParallelDims


@dataclass
class ParallelRuntime:
    """This rank's view of the mesh: its coordinates and the groups it belongs to."""

    dims: ParallelDims
    rank: int
    device: torch.device
    tp_group: Any
    cp_group: Any
    dp_group: Any
    # CP x DP: the group the loss's token count and the gradients are reduced over
    dp_cp_group: Any
    # 2-D context parallelism (`cp_sizes`): the all-to-all group (consecutive CP ranks) and
    # the ring group (the same position in every all-to-all group); None otherwise
    ulysses_group: Any = None
    ring_group: Any = None

    @property
    def tp_rank(self) -> int:
        return self.dims.coords(self.rank)[0]

    @property
    def cp_rank(self) -> int:
        return self.dims.coords(self.rank)[1]

    @property
    def dp_rank(self) -> int:
        return self.dims.coords(self.rank)[2]


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def init_parallel(
    dims: ParallelDims,
    *,
    rank: int,
    init_method: str,
    backend: str = "auto",
    timeout_s: int = 600,
    cp_sizes: tuple[int, int] | None = None,
) -> ParallelRuntime:
    """Join the world and build megatron-core's TP/CP/DP groups.

    `init_method` is a torch.distributed rendezvous URL (`tcp://host:port` or `file://path`).
    `cp_sizes=(ulysses, ring)` with ulysses * ring == cp also splits the CP group in two
    (megatron's hierarchical CP groups): CP ranks u*g .. u*g+u-1 form ulysses group g, and CP
    ranks p, p+u, p+2u, ... form ring group p.
    """
    problems = dims.problems()
    if cp_sizes is not None:
        ulysses, ring = cp_sizes
        if ulysses < 1 or ring < 1 or ulysses * ring != dims.cp:
            problems.append(f"cp_sizes=(ulysses={ulysses}, ring={ring}) must be >= 1 and "
                            f"multiply to parallel.cp={dims.cp}")
    if problems:
        raise ValueError("; ".join(problems))
    backend = resolve_backend(backend)
    if backend == "nccl":
        # LOCAL_RANK from torchrun-style launchers; one process per visible GPU otherwise
        local_rank = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # DeepSpeed (ZeRO, Ulysses) takes this process's device from LOCAL_RANK, which torch's and
    # DeepSpeed's launchers set and ours (Ray workers, spawned tests) do not: set it where the
    # process's device is chosen
    os.environ.setdefault("LOCAL_RANK", str(device.index or 0 if device.type == "cuda" else 0))
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=dims.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return _build_mesh(dims, rank=rank, device=device, timeout_s=timeout_s, cp_sizes=cp_sizes)


def _build_mesh(dims: ParallelDims, *, rank: int, device: torch.device, timeout_s: int,
                cp_sizes: tuple[int, int] | None) -> ParallelRuntime:
    """megatron-core's TP/CP/DP (and 2-D CP) groups over the already joined world."""
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        context_parallel_size=dims.cp,
        # minutes as a float: timeouts under a minute stay what parallel.timeout_s says
        distributed_timeout_minutes=timeout_s / 60,
        # level 0 is consecutive ranks (the all-to-all), level 1 strides over them (the ring)
        hierarchical_context_parallel_sizes=list(cp_sizes) if cp_sizes is not None else None,
    )
    ulysses_group, ring_group = (ps.get_hierarchical_context_parallel_groups()
                                 if cp_sizes is not None else (None, None))
    return ParallelRuntime(
        dims=dims,
        rank=rank,
        device=device,
        tp_group=ps.get_tensor_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        ulysses_group=ulysses_group,
        ring_group=ring_group,
    )


def remesh(runtime: ParallelRuntime, dims: ParallelDims, *, timeout_s: int = 600,
           cp_sizes: tuple[int, int] | None = None) -> ParallelRuntime:
    """Rebuild the groups with other degrees over the same world (tests and benchmarks use it
    to try several layouts without starting new processes)."""
    from megatron.core import parallel_state as ps

    problems = dims.problems()
    if dims.world_size != runtime.dims.world_size:
        problems.append(f"remesh keeps the world: world_size {dims.world_size} != "
                        f"{runtime.dims.world_size}")
    if problems:
        raise ValueError("; ".join(problems))
    ps.destroy_model_parallel()
    return _build_mesh(dims, rank=runtime.rank, device=runtime.device, timeout_s=timeout_s,
                       cp_sizes=cp_sizes)


def shutdown_parallel() -> None:
    """Destroy megatron's groups and the default group; safe to call twice."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
