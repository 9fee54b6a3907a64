"""Gradient reduction over CP x DP that overlaps the backward: bucketed, in fp32 by default,
with no flat copy of all the gradients.

Each parameter's gradient lives in a view of its bucket's buffer (`optim.grad_reduce_dtype`:
fp32, or the parameter's dtype), Megatron's `main_grad`: a hook after each accumulation adds
the fresh gradient into the view and frees it, so micro-batches accumulate in that precision
too. Buckets hold about `optim.grad_bucket_mb` MiB of parameters in reverse registration order
(the order the backward produces them). On a step's last micro-batch a bucket's all-reduce
starts asynchronously as soon as every parameter in it has received its gradients, while the
backward goes on; `finish` starts whatever is left and waits.

How many times a parameter's gradient is accumulated in one backward is not always one (the
chunked loss recomputes the LM head once per chunk in its own backward, and a tied embedding
is reached twice): each parameter's count is learned from the previous step's last backward.
The first step, and any accumulation that arrives after its bucket has started (the counts
changed, e.g. a schedule stage with another length), are still exact: such late gradients are
kept aside, summed over the group in `finish`, and added. Buckets always start in index order,
so every rank issues the same collectives in the same order.

Sum, not mean: each rank's loss is already divided by the global target count.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

DTYPES = {"fp32": torch.float32, "param": None}


def sum_flat(tensors: list[torch.Tensor], *, group: Any) -> None:
    """Sum each tensor over `group` in place, with one all-reduce of their concatenation (for a
    few small tensors: late gradients, the norms' weights)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class _Bucket:
    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype) -> None:
        self.params = params
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=dtype,
                                  device=params[0].device)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in params:
            self.views.append(self.buffer[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.pending = 0
        self.handle: Any = None
        self.started = False


class GradReducer:
    """Owns the gradients of `params` (see the module docstring); `grads()` gives them after
    `finish`, in the reduction dtype."""

    def __init__(self, params: list[nn.Parameter], *, group: Any, dtype: Optional[str] = "fp32",
                 bucket_mb: float = 25.0) -> None:
        self.params = params
        self.group = group
        self.last = True
        cap = max(1, int(bucket_mb * (1 << 20)))
        chunks: list[list[nn.Parameter]] = [[]]
        size = 0
        for p in reversed(params):
            if chunks[-1] and size + p.numel() * p.element_size() > cap:
                chunks.append([])
                size = 0
            chunks[-1].append(p)
            size += p.numel() * p.element_size()
        want = DTYPES[dtype or "fp32"]
        self.buckets = [_Bucket(c, want or c[0].dtype) for c in chunks if c]
        self.where: dict[nn.Parameter, tuple[int, int]] = {}
        for i, b in enumerate(self.buckets):
            for j, p in enumerate(b.params):
                self.where[p] = (i, j)
        self.expected: dict[nn.Parameter, int] = {}
        self.seen: dict[nn.Parameter, int] = {}
        self.late: dict[nn.Parameter, torch.Tensor] = {}
        self.next_bucket = 0
        self.hooks = [p.register_post_accumulate_grad_hook(self._accumulated) for p in params]

    # ------------------------------------------------------------------ the step's life

    def zero(self) -> None:
        """Before a step's first micro-batch."""
        for b in self.buckets:
            b.buffer.zero_()
            b.handle, b.started = None, False
        for p in self.params:
            p.grad = None
        self.late.clear()
        self.next_bucket = 0

    def begin_backward(self, *, last: bool) -> None:
        """Before each micro-batch's backward (`last`: the step's last one, whose gradients
        complete the buckets)."""
        self.last = last
        if last:
            self.seen = {p: 0 for p in self.params}
            for b in self.buckets:
                b.pending = sum(1 for p in b.params if self.expected.get(p, 0) > 0)

    def finish(self) -> list[torch.Tensor]:
        """Start the buckets not started yet, wait for all, fold in late gradients; returns
        each parameter's summed gradient (in the reduction dtype)."""
        self.expected = {p: n for p, n in self.seen.items() if n > 0}
        for b in self.buckets:
            b.pending = 0
        self._start_ready(force=True)
        for b in self.buckets:
            if b.handle is not None:
                b.handle.wait()
        if self.late:
            # gradients that came after their bucket had started (see the module docstring)
            late = [p for p in self.params if p in self.late]
            sum_flat([self.late[p] for p in late], group=self.group)
            for p in late:
                i, j = self.where[p]
                self.buckets[i].views[j].add_(self.late[p])
            self.late.clear()
        return self.grads()

    def grads(self) -> list[torch.Tensor]:
        return [self.buckets[i].views[j] for i, j in (self.where[p] for p in self.params)]

    # ------------------------------------------------------------------ hooks

    def _accumulated(self, p: nn.Parameter) -> None:
        i, j = self.where[p]
        bucket = self.buckets[i]
        grad, p.grad = p.grad, None
        if bucket.started:
            if p in self.late:
                self.late[p].add_(grad)
            else:
                self.late[p] = grad.to(bucket.buffer.dtype, copy=True)
        else:
            bucket.views[j].add_(grad)
        if not self.last:
            return
        self.seen[p] += 1
        if self.seen[p] == self.expected.get(p, 0):
            bucket.pending -= 1
            if bucket.pending == 0:
                self._start_ready(force=False)

    def _start_ready(self, *, force: bool) -> None:
        """Start buckets in index order while the next one is complete (`force`: all)."""
        while self.next_bucket < len(self.buckets):
            b = self.buckets[self.next_bucket]
            if not force and (b.pending > 0 or not self.expected):
                return
            b.started = True
            b.handle = dist.all_reduce(b.buffer, group=self.group, async_op=True)
            self.next_bucket += 1

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
