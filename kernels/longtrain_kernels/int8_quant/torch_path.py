"""Vectorized PyTorch path of group-wise int8 quantization (CPU, or any device on request).

Legend: N = x.numel(), G group_size, NG = ceil(N / G) groups. Arguments are checked by
function.py. The quantizer makes one float32 [NG, G] working buffer (the input copied in,
zero-padded, then divided, rounded and clamped in place) besides its outputs; the
dequantizer one float32 [NG, G] product besides its output (none for float32 outputs).
"""

from __future__ import annotations

import math

import torch


def quantize_torch(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [NG * G], scale float32 [NG]) of x (any float dtype, shape and strides)."""
    n = x.numel()
    n_groups = -(-n // group_size)
    work = torch.empty(n_groups * group_size, dtype=torch.float32, device=x.device)
    work[n:].zero_()
    # One pass: copy_ converts the dtype and gathers a non-contiguous x in row-major order.
    work[:n].view(x.shape).copy_(x)
    groups_ng = work.view(n_groups, group_size)
    # max |x| = max(|max x|, |min x|): one pass, no full-size abs() temporary.
    lo, hi = torch.aminmax(groups_ng, dim=1)
    # Divide by a 127 *tensor*: CUDA turns division by a Python scalar into a multiplication
    # by its reciprocal, which is not the correctly rounded quotient the kernel computes.
    scale = torch.maximum(hi.abs_(), lo.abs_()).div_(
        torch.full((), 127.0, dtype=torch.float32, device=x.device))
    # An all-zero group has scale 0: divide it by 1 instead, giving q = 0 (not NaN).
    divisor = torch.where(scale > 0, scale, 1.0)
    groups_ng.div_(divisor[:, None]).round_().clamp_(-127, 127)
    return work.to(torch.int8), scale


def dequantize_torch(q: torch.Tensor, scale: torch.Tensor, *, shape: torch.Size | tuple,
                     dtype: torch.dtype, group_size: int) -> torch.Tensor:
    """x [shape] in dtype (contiguous, new) with x.reshape(-1)[i] = q[i] * scale[i // G]."""
    n = math.prod(shape)
    groups_ng = q.view(-1, group_size).to(torch.float32).mul_(scale[:, None])
    return groups_ng.view(-1)[:n].view(shape).to(dtype)
