"""Triton kernels, each folder beside its pure-PyTorch reference (`naive.py`).

Installed as `longtrain_kernels` (the PyPI name `kernels` belongs to another project).
Triton is imported inside the launchers, so this package imports on CPU-only machines.
"""

from longtrain_kernels._function_common import KERNELS, resolve_kernels

__all__ = ["KERNELS", "resolve_kernels"]
