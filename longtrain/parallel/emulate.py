"""Emulated links: make this machine's loopback communication take as long as a cluster's
links would, so a benchmark on one machine can show what the network costs.

While `emulated_links(...)` is active, each communicating `torch.distributed` call takes at
least the time `longtrain.parallel.collective_cost` gives for its bytes, group size and the
link the group travels over (from a cluster preset): a blocking call returns no earlier than
that after it started; an asynchronous one (`isend` / `irecv`, `batch_isend_irecv`,
`async_op=True`) is in flight from its start, and its `wait()` returns no earlier than that
after the start, so compute issued in between overlaps the transfer as it would on the
cluster. The real transfer still happens (results are unchanged); its own time counts
toward the emulated one.

A receive cannot see when its message was sent, so it is timed from the later of its own
start and the message's arrival here: when the real receive had to wait for the sender (a
chain of hops, each rank waiting on the one before), the link time is added after the
arrival; when the message was already here (ring's exchange, posted by both sides at once,
waited on after the block's compute), it counts from the receive's start.

The delays are host-side sleeps: meant for gloo on CPU, where a call's return is its
completion (on CUDA they would not delay the stream).

`dilation` stretches every link time: a CPU computes ~1000x slower than the GPU the preset
describes, so to keep the ratio of compute to communication the link is slowed by the same
factor (`dilation_for`: the preset's achieved GEMM rate over this machine's).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from longtrain.parallel import collective_cost as cc
from longtrain.parallel.commtime import wrapped_distributed

__all__ = ["emulated_links", "link_seconds"]


def _nbytes(x: Any) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.numel() * x.element_size())
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0.0


def _p2p(n: float, c: int, link: cc.Link) -> float:
    return cc.p2p(n, link)


# name -> (collective_cost formula, the argument holding the tensor(s) it sizes by)
_FORMULAS: dict[str, tuple[Callable[[float, int, cc.Link], float], str]] = {
    "send": (_p2p, "tensor"), "recv": (_p2p, "tensor"), "isend": (_p2p, "tensor"),
    "irecv": (_p2p, "tensor"), "broadcast": (_p2p, "tensor"), "reduce": (_p2p, "tensor"),
    "all_reduce": (cc.all_reduce, "tensor"),
    "all_gather": (cc.all_gather, "tensor"),
    "all_gather_into_tensor": (cc.all_gather, "input_tensor"),
    "reduce_scatter": (cc.reduce_scatter, "input_list"),
    "reduce_scatter_tensor": (cc.reduce_scatter, "input"),
    "all_to_all_single": (cc.all_to_all, "input"),
    "all_to_all": (cc.all_to_all, "input_tensor_list"),
}


def link_seconds(name: str, arguments: dict[str, Any], *, c: int, link: cc.Link) -> float:
    """The collective_cost time of one call of `torch.distributed.<name>` (its `arguments`
    by parameter name) over a group of c ranks on `link` (0 for calls that move nothing)."""
    if name == "barrier":
        return link.latency_s if c > 1 else 0.0
    if name not in _FORMULAS:
        return 0.0
    formula, sized_by = _FORMULAS[name]
    if formula is not _p2p and c <= 1:
        return 0.0
    return formula(_nbytes(arguments.get(sized_by)), c, link)


# a real wait longer than this waited for the sender (loopback moves the bytes in less)
_BLOCKED_S = 2e-4


class _DelayedWork:
    """A work handle whose `wait()` returns no earlier than `seconds` after its start or, for
    a receive that had to wait for its message, after the message arrived."""

    def __init__(self, work: Any, start: float, seconds: float, *, receive: bool) -> None:
        self._work, self._start, self._seconds, self._receive = work, start, seconds, receive

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        called = time.perf_counter()
        out = self._work.wait(*args, **kwargs)
        arrived = time.perf_counter()
        blocked = self._receive and arrived - called > _BLOCKED_S
        _sleep_until((arrived if blocked else self._start) + self._seconds)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def _sleep_until(t: float) -> None:
    left = t - time.perf_counter()
    if left > 0:
        time.sleep(left)


_CALLS = (*_FORMULAS, "barrier")


@contextlib.contextmanager
def emulated_links(link_of: Callable[[Any], cc.Link], *, dilation: float = 1.0,
                   tally: Optional[dict[str, float]] = None) -> Iterator[None]:
    """While active, each communicating call takes at least `dilation` x its collective_cost
    time on `link_of(group)` (group None: the default group). See the module docstring.
    `tally`, if given, sums the link seconds before dilation ('seconds') of the receives and
    collectives (a send travels alongside its peer's receive, so it is not counted twice) and
    counts them ('calls')."""
    if dilation < 0:
        raise ValueError(f"dilation={dilation} must be >= 0")

    def charged(seconds: float, *, send: bool = False) -> float:
        """The dilated time of a call whose link time is `seconds`, tallied."""
        if tally is not None and not send:
            tally["seconds"] = tally.get("seconds", 0.0) + seconds
            tally["calls"] = tally.get("calls", 0) + 1
        return dilation * seconds

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn)

        def delayed(*args: Any, **kwargs: Any) -> Any:
            arguments = signature.bind(*args, **kwargs).arguments
            group = arguments.get("group")
            c = dist.get_world_size(group)
            seconds = charged(link_seconds(name, arguments, c=c, link=link_of(group)),
                              send=name in ("send", "isend"))
            start = time.perf_counter()
            receive = name in ("recv", "irecv")
            if name in ("isend", "irecv") or arguments.get("async_op"):
                out = fn(*args, **kwargs)
                return None if out is None else _DelayedWork(out, start, seconds,
                                                             receive=receive)
            out = fn(*args, **kwargs)
            arrived = time.perf_counter()
            blocked = receive and arrived - start > _BLOCKED_S
            _sleep_until((arrived if blocked else start) + seconds)
            return out

        delayed.__wrapped__ = fn
        return delayed

    batch = dist.batch_isend_irecv
    receivers = (dist.irecv, dist.recv)  # the real ones, which a P2POp holds

    def batch_isend_irecv(ops: list[Any]) -> list[Any]:
        group = getattr(ops[0], "group", None) if ops else None
        link = link_of(group)
        start = time.perf_counter()
        seconds = [charged(cc.p2p(_nbytes(op.tensor), link), send=op.op not in receivers)
                   for op in ops]
        works = batch(ops)
        if len(works) != len(ops):
            # a backend that coalesces the batch into one work (NCCL): the slowest op's time
            return [_DelayedWork(w, start, max(seconds, default=0.0), receive=True)
                    for w in works]
        # the ops travel side by side: each takes its own link time from the start
        return [_DelayedWork(w, start, t, receive=op.op in receivers)
                for w, t, op in zip(works, seconds, ops)]

    wrappers = {n: wrap(n, getattr(dist, n)) for n in _CALLS if hasattr(dist, n)}
    wrappers["batch_isend_irecv"] = batch_isend_irecv
    with wrapped_distributed(wrappers):
        yield


def dilation_for(peak_tflops: float, gemm_eff: float, measured_tflops: float) -> float:
    """How many times slower this machine's GEMMs run than the emulated device's achieved
    rate (peak x efficiency): the factor links are stretched by."""
    if measured_tflops <= 0:
        raise ValueError(f"measured_tflops={measured_tflops} must be > 0")
    return peak_tflops * gemm_eff / measured_tflops
