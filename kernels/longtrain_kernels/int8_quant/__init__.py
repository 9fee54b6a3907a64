"""Group-wise int8 storage of activations saved for backward (Mesa-style memory saving).

`quantize` turns any float tensor into int8 values with one float32 scale per group of
`group_size` consecutive elements (1 byte per element plus 4 per group); `dequantize`
restores a tensor of the original shape and dtype, within max|group| / 254 per element.
Triton kernels on CUDA, a vectorized PyTorch path otherwise, bit-identical to each other;
`quantize_naive` / `dequantize_naive` are the float64 references used by tests. See
README.md. Importing this package does not import triton.
"""

from longtrain_kernels.int8_quant.function import available, dequantize, quantize
from longtrain_kernels.int8_quant.naive import dequantize_naive, quantize_naive

__all__ = [
    "available",
    "dequantize",
    "dequantize_naive",
    "quantize",
    "quantize_naive",
]
