"""Triton kernels, each folder beside its pure-PyTorch reference (`naive.py`).

Installed as `longtrain_kernels` (the PyPI name `kernels` belongs to another project).
Triton is imported inside the launchers, so this package imports on CPU-only machines.
"""
