"""Block flash attention with log-sum-exp: the unit of ring attention (see README.md).

`flash_block_forward` / `flash_block_backward` compute one query block against one key/value
block with global position offsets and document ids; `flash_attention` is the differentiable
single-device op; the `naive` functions are the PyTorch reference. Importing this package
does not import triton.
"""

from longtrain_kernels._function_common import available
from longtrain_kernels.flash_attn.function import flash_attention
from longtrain_kernels.flash_attn.launch import flash_block_backward, flash_block_forward
from longtrain_kernels.flash_attn.naive import (attention_block_naive,
                                                attention_block_naive_backward)

__all__ = [
    "attention_block_naive",
    "attention_block_naive_backward",
    "available",
    "flash_attention",
    "flash_block_backward",
    "flash_block_forward",
]
