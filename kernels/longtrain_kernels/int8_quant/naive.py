"""Float64 reference for group-wise int8 quantization (test oracle; no speed concerns).

The op is defined in float32 (see function.py), so the reference computes in float64 and
rounds to float32 exactly where the definition does: the input (exact for fp16/bf16/fp32),
the scale, the quotient x / scale before it is rounded to an integer, and the dequantized
product before the cast to the output dtype. Each float64 operation below acts on float32
values, so rounding its float64 result to float32 gives the correctly rounded float32 result
(float64 has more than 2 * 24 + 2 bits). Without the quotient rounding, about 1.4 elements
in 10^6 of random fp32 input (quotients that float32 rounds onto a .5 tie) would differ by 1.
"""

from __future__ import annotations

import math

import torch


def quantize_naive(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [n_groups * group_size], scale float32 [n_groups]) of x taken as x.reshape(-1).

    scale[g] = max |x| over group g / 127; q = round-half-to-even(x / scale) clamped to
    [-127, 127], 0 in the padding after the last element and in all-zero groups (scale 0).
    """
    n = x.numel()
    n_groups = -(-n // group_size)
    flat = torch.zeros(n_groups * group_size, dtype=torch.float64, device=x.device)
    flat[:n] = x.reshape(-1).to(torch.float32).to(torch.float64)
    groups = flat.view(n_groups, group_size)
    scale = (groups.abs().amax(dim=1) / 127).to(torch.float32)
    divisor = torch.where(scale > 0, scale.to(torch.float64), 1.0)
    ratio = (groups / divisor[:, None]).to(torch.float32).to(torch.float64)
    q = torch.round(ratio).clamp(-127, 127).to(torch.int8)
    return q.reshape(-1), scale


def dequantize_naive(q: torch.Tensor, scale: torch.Tensor, *, shape: torch.Size | tuple,
                     dtype: torch.dtype, group_size: int) -> torch.Tensor:
    """x [shape] in dtype with x.reshape(-1)[i] = q[i] * scale[i // group_size]."""
    n = math.prod(shape)
    groups = q.to(torch.float64).view(-1, group_size) * scale.to(torch.float64)[:, None]
    return groups.reshape(-1)[:n].to(torch.float32).to(dtype).reshape(shape)
