"""Megatron sequence parallelism's communication over the TP group, along the sequence dim of
[B, T, ...] activations (megatron-core's own sequence-parallel linears need CUDA buffers, so
the model runs megatron's weights through these on every device).

Between the parallel linears each TP rank holds a contiguous 1/tp of the (local) sequence:
- `gather_linear`, a column-parallel linear on this rank's tokens: the input all-gathered for
  the product, and again in the backward for the weight's gradient, so that only the T / tp
  tokens are kept for the backward (megatron-core's choice); its input gradient
  reduce-scattered;
- `reduce_scatter` after a row-parallel linear: its partial sums reduce-scattered forward,
  all-gathered backward;
- `scatter` after the embedding (whose output is already summed over TP): this rank's slice
  forward, all-gather backward;
- `gather_summed_grad` before a megatron column-parallel layer that sums its input gradient
  over TP itself (the LM head): all-gather forward, this rank's slice backward.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from longtrain.parallel.watch import collective


def _size(group: Any) -> int:
    return dist.get_world_size(group)


def _all_gather(x_bt_: torch.Tensor, group: Any) -> torch.Tensor:
    parts = [torch.empty_like(x_bt_) for _ in range(_size(group))]
    with collective("sequence-parallel all-gather", group="tensor-parallel"):
        dist.all_gather(parts, x_bt_.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _parts(x_bt_: torch.Tensor, group: Any) -> tuple[torch.Tensor, ...]:
    """x's tokens cut into one contiguous piece per TP rank."""
    n = _size(group)
    if x_bt_.shape[1] % n:
        raise ValueError(f"sequence parallelism: {x_bt_.shape[1]} tokens do not split over "
                         f"{n} TP ranks")
    return x_bt_.chunk(n, dim=1)


def _reduce_scatter(x_bt_: torch.Tensor, group: Any) -> torch.Tensor:
    parts = [p.contiguous() for p in _parts(x_bt_, group)]
    out = torch.empty_like(parts[0])
    with collective("sequence-parallel reduce-scatter", group="tensor-parallel"):
        dist.reduce_scatter(out, parts, group=group)
    return out


def _mine(x_bt_: torch.Tensor, group: Any) -> torch.Tensor:
    return _parts(x_bt_, group)[dist.get_rank(group)].contiguous()


class _Exchange(torch.autograd.Function):
    """`forward_op` on the activations, `backward_op` on their gradient (both over the TP
    group): the three plain exchanges below are pairs of `_all_gather`, `_reduce_scatter` and
    `_mine`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, forward_op: Callable,
                backward_op: Callable) -> torch.Tensor:
        ctx.group, ctx.backward_op = group, backward_op
        return forward_op(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return ctx.backward_op(grad, ctx.group), None, None, None


class _GatherLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Any, group: Any
                ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.has_bias = group, bias is not None
        return torch.nn.functional.linear(_all_gather(x, group), weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight = ctx.saved_tensors
        full = _all_gather(x, ctx.group)
        grad_x = _reduce_scatter(grad.matmul(weight), ctx.group)
        grad_w = grad.reshape(-1, grad.shape[-1]).t().matmul(full.reshape(-1, full.shape[-1]))
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_x, grad_w.to(weight.dtype), grad_b, None


def gather_linear(x_bt_: torch.Tensor, weight: torch.Tensor, bias: Any, group: Any
                  ) -> torch.Tensor:
    return _GatherLinear.apply(x_bt_, weight, bias, group)


def gather_summed_grad(x_bt_: torch.Tensor, group: Any) -> torch.Tensor:
    return _Exchange.apply(x_bt_, group, _all_gather, _mine)


def reduce_scatter(x_bt_: torch.Tensor, group: Any) -> torch.Tensor:
    return _Exchange.apply(x_bt_, group, _reduce_scatter, _all_gather)


def scatter(x_bt_: torch.Tensor, group: Any) -> torch.Tensor:
    return _Exchange.apply(x_bt_, group, _mine, _all_gather)
