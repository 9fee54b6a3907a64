"""Shared by the ops' dispatch modules (`<op>/function.py`): whether the Triton kernels can
run, which implementation a kernels setting picks, the (forward, backward) pair a backend
name resolves to, and the accepted dtypes.

Imports no triton at module level (it only asks whether triton is installed), so
`import longtrain_kernels.<op>` works on machines without it.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, NamedTuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DOC_DTYPES = (torch.int32, torch.int64)
# The kernels setting (`train.kernels`, each op's `backend=`): "auto" takes the Triton kernels
# on CUDA tensors when triton is importable and the PyTorch path otherwise; "triton" and
# "torch" force one.
KERNELS = ("auto", "triton", "torch")


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def available() -> bool:
    """True where the Triton kernels run on their own: triton importable and a CUDA device."""
    return has_triton() and torch.cuda.is_available()


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton can launch on tensors of `device`: CUDA, or CPU when Triton's own
    interpreter is switched on (how the tests run the kernels without a GPU)."""
    if device.type == "cuda":
        return True
    import triton

    knobs = getattr(triton, "knobs", None)
    # Triton before 3.4 has no knobs to ask: let Triton itself refuse at launch.
    return knobs is None or bool(knobs.runtime.interpret)


def resolve_kernels(backend: str, x: torch.Tensor, *, supported: bool = True) -> str:
    """The implementation ("triton" or "torch") the kernels setting `backend` picks for
    tensors like `x`; `supported`: whether the Triton kernels take these shapes and dtypes
    (consulted by "auto" only). Forcing "triton" where it cannot run is a ValueError."""
    if backend not in KERNELS:
        raise ValueError(f"backend={backend!r} must be one of {list(KERNELS)}")
    if backend == "auto":
        return "triton" if x.is_cuda and available() and supported else "torch"
    if backend == "triton":
        if not has_triton():
            raise ValueError("backend='triton' needs triton, which is not importable")
        if not triton_runs_on(x.device):
            raise ValueError(f"backend='triton' needs CUDA tensors (got device {x.device}) "
                             "unless Triton's interpreter is on (TRITON_INTERPRET=1)")
    return backend


class Backend(NamedTuple):
    """One backend's host functions: forward -> (out, lse or state), backward -> grads."""

    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
