"""Causal linear attention with per-head decay and document resets (Lightning Attention-2).

`lightning_attention` is the differentiable op (Triton kernels on CUDA, the blocked PyTorch
path otherwise), `lightning_attention_torch` forces the PyTorch path, and
`lightning_attention_naive` is the serial float64 reference used by tests. See README.md.
Importing this package does not import triton.
"""

from longtrain_kernels.lightning_attn.function import (available, lightning_attention,
                                                       lightning_attention_torch)
from longtrain_kernels.lightning_attn.launch import lightning_backward, lightning_forward
from longtrain_kernels.lightning_attn.naive import lightning_attention_naive

__all__ = [
    "available",
    "lightning_attention",
    "lightning_attention_naive",
    "lightning_attention_torch",
    "lightning_backward",
    "lightning_forward",
]
