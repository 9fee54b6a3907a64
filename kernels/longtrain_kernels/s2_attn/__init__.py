"""S2-Attention: heterogeneous per-head block-sparse causal attention (see README.md).

`S2Pattern` defines which key blocks each global head reads; `s2_attention` is the
differentiable op (Triton on CUDA, the block-skipping PyTorch path elsewhere),
`s2_attention_lse` also returns the log-sum-exp, and `s2_reference` is the dense masked
softmax it is tested against. Importing this package does not import triton.
"""

from longtrain_kernels.s2_attn.function import available, s2_attention, s2_attention_lse
from longtrain_kernels.s2_attn.naive import s2_mask, s2_reference, s2_reference_lse
from longtrain_kernels.s2_attn.pattern import S2Pattern

__all__ = [
    "S2Pattern",
    "available",
    "s2_attention",
    "s2_attention_lse",
    "s2_mask",
    "s2_reference",
    "s2_reference_lse",
]
