"""Shared by the ops' dispatch modules (`<op>/function.py`): whether the Triton kernels can
run, the (forward, backward) pair a backend name resolves to, and the accepted dtypes.

Imports no triton (it only asks whether triton is installed), so `import longtrain_kernels.<op>`
works on machines without it.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, NamedTuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DOC_DTYPES = (torch.int32, torch.int64)


def available() -> bool:
    """True where the Triton kernels can run: triton importable and a CUDA device, or
    TRITON_INTERPRET=1 (the CPU interpreter, for tests)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


class Backend(NamedTuple):
    """One backend's host functions: forward -> (out, lse or state), backward -> grads."""

    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
