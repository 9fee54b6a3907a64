"""Host launchers for the int8 quantization kernels: allocate, grid, launch.

Legend: N = numel of the unquantized tensor, G group_size, NG = ceil(N / G) groups. No
argument checks here (function.py checks before dispatching). Triton is imported inside the
functions, so this module imports on machines without it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from longtrain_kernels import _launch_common
from longtrain_kernels._launch_common import device_ctx, empty

# Elements one program quantizes: BLOCK_GROUPS = max(1, DEFAULT_BLOCK_ELEMS // G). Not tuned.
DEFAULT_BLOCK_ELEMS = 4096
# Under DEBUG_FILL_NAN the int8 output starts as -128, a value the kernel never stores.
_INT8_UNWRITTEN = -128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_groups(group_size: int, block_groups: Optional[int]) -> int:
    block_groups = block_groups or max(1, DEFAULT_BLOCK_ELEMS // group_size)
    if block_groups < 1 or block_groups & (block_groups - 1):
        raise ValueError(f"block_groups={block_groups} must be a power of two >= 1")
    return block_groups


def quantize_triton(x: torch.Tensor, group_size: int, *, block_groups: Optional[int] = None,
                    num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [NG * G], scale float32 [NG]) of x (any float dtype and shape; a
    non-contiguous x is copied to row-major order first). One program per block_groups
    consecutive groups."""
    block_groups = _block_groups(group_size, block_groups)
    from longtrain_kernels.int8_quant import kernel

    x_n = x.reshape(-1)
    n = x_n.numel()
    n_groups = _cdiv(n, group_size)
    if _launch_common.DEBUG_FILL_NAN:
        q = torch.full((n_groups * group_size, ), _INT8_UNWRITTEN, dtype=torch.int8,
                       device=x.device)
    else:
        q = torch.empty(n_groups * group_size, dtype=torch.int8, device=x.device)
    scale = empty((n_groups, ), like=x, dtype=torch.float32)
    if n_groups == 0:
        return q, scale
    with device_ctx(x):
        kernel.quantize_kernel[(_cdiv(n_groups, block_groups), )](
            x_n, q, scale, n, n_groups, GROUP=group_size, BLOCK_GROUPS=block_groups,
            num_warps=num_warps)
    return q, scale


def dequantize_triton(q: torch.Tensor, scale: torch.Tensor, *, shape: torch.Size | tuple,
                      dtype: torch.dtype, group_size: int, block_groups: Optional[int] = None,
                      num_warps: int = 4) -> torch.Tensor:
    """x [shape] in dtype (new, contiguous) = q [NG * G] int8 * scale [NG] float32 per group,
    computed in float32 and cast. One program per block_groups consecutive groups."""
    block_groups = _block_groups(group_size, block_groups)
    from longtrain_kernels.int8_quant import kernel

    n = math.prod(shape)
    n_groups = scale.numel()
    out = empty(tuple(shape), like=q, dtype=dtype)
    if n == 0:
        return out
    with device_ctx(q):
        kernel.dequantize_kernel[(_cdiv(n_groups, block_groups), )](
            q, scale, out, n, n_groups, GROUP=group_size, BLOCK_GROUPS=block_groups,
            OUT_BF16=dtype == torch.bfloat16, num_warps=num_warps)
    return out
