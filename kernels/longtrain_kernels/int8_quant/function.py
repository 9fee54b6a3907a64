"""Argument checks and backend dispatch for group-wise int8 quantization.

Legend: N = numel of the unquantized tensor, G group_size, NG = ceil(N / G) groups. Two
backends give bit-identical results: "torch" (torch_path.py, any device) and "triton"
(launch.py, CUDA, or CPU tensors under Triton's interpreter). Both compute in float32: x is
cast to float32 (exact for fp16/bf16/fp32), scale = fl32(absmax / 127), q = round-half-to-
even(fl32(x / scale)) clamped to [-127, 127]; dequantization is fl32(q * scale) cast to the
output dtype. Not differentiable (inputs are detached).
"""

from __future__ import annotations

import math
import operator

import torch

from longtrain_kernels._function_common import FLOAT_DTYPES, available, resolve_kernels
from longtrain_kernels.int8_quant import launch, torch_path

__all__ = ["available", "dequantize", "quantize"]

MIN_GROUP_SIZE, MAX_GROUP_SIZE = 16, 4096


def _check_group_size(group_size: int) -> None:
    if (isinstance(group_size, bool) or not isinstance(group_size, int)
            or not MIN_GROUP_SIZE <= group_size <= MAX_GROUP_SIZE
            or group_size & (group_size - 1)):
        raise ValueError(f"group_size={group_size!r} must be a power of two between "
                         f"{MIN_GROUP_SIZE} and {MAX_GROUP_SIZE}")


def _check_quantize(x: torch.Tensor, group_size: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of dtype in {FLOAT_DTYPES}; got {got}")
    _check_group_size(group_size)


def _check_dequantize(q: torch.Tensor, scale: torch.Tensor, shape: torch.Size | tuple,
                      dtype: torch.dtype, group_size: int) -> tuple[int, ...]:
    """The checked shape as a tuple of ints."""
    _check_group_size(group_size)
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or q.dim() != 1:
        got = ((q.dtype, tuple(q.shape)) if isinstance(q, torch.Tensor)
               else type(q).__name__)
        raise ValueError(f"q must be a 1-d int8 tensor; got {got}")
    if q.numel() % group_size:
        raise ValueError(f"q has {q.numel()} elements, not a multiple of "
                         f"group_size={group_size}")
    n_groups = q.numel() // group_size
    if (not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32
            or tuple(scale.shape) != (n_groups, )):
        got = ((scale.dtype, tuple(scale.shape)) if isinstance(scale, torch.Tensor)
               else type(scale).__name__)
        raise ValueError(f"scale must be float32 [q.numel() // group_size] = [{n_groups}]; "
                         f"got {got}")
    if scale.device != q.device:
        raise ValueError(f"scale is on {scale.device}, q on {q.device}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype} must be one of {FLOAT_DTYPES}")
    try:
        dims = tuple(operator.index(d) for d in shape)
    except (TypeError, ValueError):
        dims = None
    if dims is None or any(d < 0 for d in dims):
        raise ValueError(f"shape={shape!r} must be a sequence of non-negative ints")
    n = math.prod(dims)
    if not (n_groups - 1) * group_size < n <= q.numel():
        raise ValueError(f"shape={dims} has {n} elements; q holds {n_groups} groups of "
                         f"{group_size}, so it must have more than "
                         f"{max(n_groups - 1, 0) * group_size} and at most {q.numel()}")
    return dims


def quantize(x: torch.Tensor, group_size: int, *,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [NG * G], scale float32 [NG]): x quantized in groups of G consecutive elements.

    x: any float dtype (fp16, bf16, fp32, fp64), any shape and strides; its elements are
    taken in row-major order of its shape (as x.reshape(-1)). NG = ceil(N / G); q is flat
    and zero-padded after element N. scale[g] = max |x| over group g / 127 and q =
    round-half-to-even(x / scale) clamped to [-127, 127], in float32 (x is cast to float32
    first). An all-zero group has scale 0 and q 0. NaN / Inf inputs are not handled.

    group_size: a power of two in [16, 4096]. backend: "auto" runs the Triton kernel on CUDA
    tensors when triton is importable and the PyTorch path otherwise; "triton" forces the
    kernel (CPU tensors only under Triton's interpreter, TRITON_INTERPRET=1); "torch" the
    PyTorch path.
    """
    _check_quantize(x, group_size)
    x = x.detach()
    if resolve_kernels(backend, x) == "triton":
        return launch.quantize_triton(x, group_size)
    return torch_path.quantize_torch(x, group_size)


def dequantize(q: torch.Tensor, scale: torch.Tensor, *, shape: torch.Size | tuple,
               dtype: torch.dtype, group_size: int, backend: str = "auto") -> torch.Tensor:
    """x [shape] in dtype, new and contiguous on q's device: the inverse of `quantize`.

    x.reshape(-1)[i] = q[i] * scale[i // G], computed in float32 and then cast to dtype.
    q int8 [NG * G], scale float32 [NG] as returned by `quantize`; prod(shape) must lie in
    ((NG - 1) * G, NG * G]. group_size and backend as in `quantize`.
    """
    dims = _check_dequantize(q, scale, shape, dtype, group_size)
    q, scale = q.detach().contiguous(), scale.detach().contiguous()
    if resolve_kernels(backend, q) == "triton":
        return launch.dequantize_triton(q, scale, shape=dims, dtype=dtype,
                                        group_size=group_size)
    return torch_path.dequantize_torch(q, scale, shape=dims, dtype=dtype,
                                       group_size=group_size)
