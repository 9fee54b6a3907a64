"""Exposed communication time: how long this rank is blocked in `torch.distributed` calls.

While a `CommTimer` is active (`with timer:`), the `torch.distributed` functions that
communicate are wrapped (module attributes, restored on exit): a blocking call is timed around the
call; an asynchronous one (`async_op=True`, `isend` / `irecv`, `batch_isend_irecv`) returns
its work wrapped so that the time spent in `wait()` is counted. Communication that overlaps
compute therefore costs nothing here, which is the point: the figure is the time the rank
could have computed but waited. Each call is charged to the role of its process group (the
labels given at install, e.g. tp / cp / dp); calls on other groups go to "other".

Megatron-core and DeepSpeed call these functions through the module at call time, so their
tensor-parallel and ZeRO collectives are included. On CUDA with NCCL a collective returns
once it is queued on the stream: the figure is host-side blocking only (the GPU-side overlap
needs the profiler).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import torch.distributed as dist

# blocking unless called with async_op=True
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "broadcast",
                "reduce", "gather", "scatter", "barrier", "send", "recv")
# always asynchronous: they return work objects
_ASYNC = ("isend", "irecv")


@contextlib.contextmanager
def wrapped_distributed(wrappers: dict[str, Callable[..., Any]]) -> Iterator[None]:
    """Replace `torch.distributed` functions by `wrappers` ({name: function}) while active,
    restoring them afterwards. A wrapped `isend` / `irecv` stays usable in a `P2POp`: torch
    accepts only its own functions there, so `P2POp` is given the real one back."""
    names = list(wrappers) + ["P2POp"]
    originals = {name: getattr(dist, name) for name in names}
    real = {wrappers[n]: originals[n] for n in _ASYNC if n in wrappers}

    def p2p_op(op: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return originals["P2POp"](real.get(op, op), *args, **kwargs)

    try:
        for name, fn in {**wrappers, "P2POp": p2p_op}.items():
            setattr(dist, name, fn)
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


class _TimedWork:
    """A work handle whose `wait()` is charged to the timer; anything else is forwarded."""

    def __init__(self, work: Any, timer: "CommTimer", label: str) -> None:
        self._work, self._timer, self._label = work, timer, label

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._timer.add(self._label, time.perf_counter() - start)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def _group_index(fn: Callable[..., Any]) -> Optional[int]:
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("group") if "group" in names else None


class CommTimer:
    """Seconds blocked in communication per group role since the last `take()`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._labels: dict[int, str] = {}
        self._groups: list[Any] = []
        self._patch: Any = None
        self._forced: Optional[str] = None
        self.enabled = True

    # ------------------------------------------------------------------ groups and totals

    def set_groups(self, groups: Iterable[tuple[str, Any]]) -> None:
        """(label, process group) pairs; the first label given to a group wins (a group that
        plays two roles, e.g. CP x DP with dp=1, is charged to the first)."""
        self._labels, self._groups = {}, []
        for label, group in groups:
            if group is not None and id(group) not in self._labels:
                self._labels[id(group)] = label
                self._groups.append(group)  # keeps the ids valid

    def label(self, group: Any) -> str:
        if self._forced is not None:
            return self._forced
        return self._labels.get(id(group), "other") if group is not None else "other"

    @contextlib.contextmanager
    def forced(self, label: str) -> Iterator[None]:
        """Charge every call made inside the block to `label`."""
        previous, self._forced = self._forced, label
        try:
            yield
        finally:
            self._forced = previous

    def add(self, label: str, seconds: float) -> None:
        if self.enabled:
            self.seconds[label] = self.seconds.get(label, 0.0) + seconds

    def take(self) -> dict[str, float]:
        """{label: seconds} since the last take, and start again from zero."""
        out, self.seconds = self.seconds, {}
        return out

    # ------------------------------------------------------------------ wrapping

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        index = _group_index(fn)
        always_async = name in _ASYNC

        def timed(*args: Any, **kwargs: Any) -> Any:
            group = kwargs.get("group")
            if group is None and index is not None and len(args) > index:
                group = args[index]
            label = self.label(group)
            if always_async or kwargs.get("async_op"):
                work = fn(*args, **kwargs)
                return _TimedWork(work, self, label) if work is not None else None
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(label, time.perf_counter() - start)

        timed.__wrapped__ = fn
        return timed

    def __enter__(self) -> "CommTimer":
        names = [n for n in (*_COLLECTIVES, *_ASYNC) if hasattr(dist, n)]
        wrappers = {n: self._wrap(n, getattr(dist, n)) for n in names}
        batch = dist.batch_isend_irecv

        def batch_isend_irecv(ops: list[Any]) -> list[Any]:
            label = self.label(getattr(ops[0], "group", None)) if ops else "other"
            return [_TimedWork(w, self, label) for w in batch(ops)]

        wrappers["batch_isend_irecv"] = batch_isend_irecv
        self._patch = wrapped_distributed(wrappers)
        self._patch.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._patch.__exit__(*exc)
