"""Host-side helpers shared by the kernel launchers (`<op>/launch.py`).

Imports no triton, so the launchers that use it import on machines without it.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

# Set by tests: outputs start as NaN instead of uninitialised memory, so an element a
# kernel forgot to write shows up.
DEBUG_FILL_NAN = False


def empty(shape: tuple[int, ...], *, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An output on `like`'s device (NaN-filled under DEBUG_FILL_NAN)."""
    if DEBUG_FILL_NAN:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def head_dim_last(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/time/head strides but need the head dim contiguous."""
    return x if x.stride(-1) == 1 else x.contiguous()


def doc_args(q_doc: Optional[torch.Tensor], k_doc: Optional[torch.Tensor], *,
             like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int, bool]:
    """(q_doc, k_doc, their batch strides, given) with contiguous time; placeholders if absent."""
    if q_doc is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=like.device)
        return dummy, dummy, 0, 0, False
    q_doc, k_doc = q_doc.contiguous(), k_doc.contiguous()
    return q_doc, k_doc, q_doc.stride(0), k_doc.stride(0), True


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs are used for checking: keep them exact rather than TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def device_ctx(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, not the current one (interpreter runs take CPU tensors)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def check_pow2_at_least_16(name: str, value: int) -> None:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name}={value} must be a power of two >= 16")
