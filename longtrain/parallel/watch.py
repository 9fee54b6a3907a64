"""Where a rank is when a collective fails: the module, the pass, the collective.

A collective that never completes (a peer died or hangs) raises after `parallel.timeout_s`
inside torch.distributed with a message that says nothing about the model. The step loop
turns that into a `CollectiveError` naming the rank, the layer, forward or backward, and the
collective, from what this module was last told:

- `track_modules(model)` records the module each forward enters and, through a gradient
  hook on its output, when its backward begins;
- `collective("ring attention send/recv", group="cp")` around the collectives our code issues;
  layers whose collectives live inside megatron-core are named by their module.

One process runs one training loop, so the record is process-global (backward on CPU runs in
the calling thread; on GPU the engine's thread writes the same record).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

__all__ = ["CollectiveError", "collective", "current", "describe_failure", "is_communication_failure",
           "set_phase", "track_modules"]

# Modules whose forward ends in a collective inside megatron-core, and which one.
_MEGATRON_COLLECTIVES = {
    "RowParallelLinear": "tensor-parallel all-reduce (RowParallelLinear)",
    "VocabParallelEmbedding": "tensor-parallel all-reduce (VocabParallelEmbedding)",
    "ColumnParallelLinear": "tensor-parallel all-reduce of the input gradient (ColumnParallelLinear)",
}


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names rank, layer, pass and collective."""


@dataclass
class _Where:
    module: str = "(outside the model)"
    phase: str = "forward"
    collective: Optional[str] = None
    since: float = 0.0


# Process-wide on purpose: one loop per process, written by autograd hooks on the engine's
# thread and by collectives deep in the attention code; the failure is described from it.
_where = _Where()
# names of the modules whose forward is running (innermost last)
_stack: list[str] = []


def current() -> _Where:
    return _where


@contextmanager
def collective(name: str, *, group: str) -> Iterator[None]:
    """Record that this rank is inside collective `name` over `group` while the block runs."""
    previous = _where.collective
    _where.collective, _where.since = f"{name} over the {group} group", time.monotonic()
    yield
    # restored only on success: a failure is described from the record as it stands
    _where.collective = previous


def _enter(name: str, kind: str, phase: str) -> None:
    _where.module, _where.phase = name, phase
    _where.collective = _MEGATRON_COLLECTIVES.get(kind)
    if _where.collective:
        _where.since = time.monotonic()


def track_modules(model: nn.Module, *, prefix: str = "") -> None:
    """Hooks on every named submodule: forward entry, and the start of its backward."""
    for name, module in model.named_modules(prefix=prefix):
        if not name:
            continue
        kind = type(module).__name__

        def pre(_mod, _args, name=name, kind=kind):
            _stack.append(_where.module)
            _enter(name, kind, "forward")

        def post(_mod, _args, out, name=name, kind=kind):
            # back in the parent's forward (e.g. attention runs after the qkv projection)
            _where.module = _stack.pop() if _stack else "(outside the model)"
            _where.collective = None
            first = out[0] if isinstance(out, tuple) else out
            if isinstance(first, torch.Tensor) and first.requires_grad:
                first.register_hook(lambda grad: _enter(name, kind, "backward"))

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def set_phase(module: str, phase: str) -> None:
    """Outside the model: e.g. ("optimizer", "gradient sum")."""
    _where.module, _where.phase, _where.collective = module, phase, None
    _stack.clear()


def describe_failure(exc: BaseException, *, rank: int, step: int, timeout_s: float) -> str:
    where = _where
    what = where.collective or "a collective"
    waited = f" after {time.monotonic() - where.since:.0f} s" if where.collective else ""
    return (f"rank {rank}: {what} failed{waited} in {where.module} ({where.phase}) at step "
            f"{step} (parallel.timeout_s={timeout_s}): {type(exc).__name__}: {exc}")


def is_communication_failure(exc: BaseException) -> bool:
    """A torch.distributed error: a timeout, a closed connection, a backend error."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Timed out", "timed out", "Connection closed", "Connection reset",
                            "gloo", "NCCL", "Broken pipe"))
