"""Autograd wrapper: single-device flash attention on the block kernels (offsets 0).

Legend: B batch, T sequence length, Hq query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from longtrain_kernels.flash_attn.launch import flash_block_backward, flash_block_forward


class FlashAttentionFunction(torch.autograd.Function):
    """Forward keeps (q, k, v, out, lse); backward recomputes the probabilities tile by tile."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                causal: bool, q_doc: Optional[torch.Tensor],
                k_doc: Optional[torch.Tensor]) -> torch.Tensor:
        out, lse = flash_block_forward(q, k, v, scale=scale, causal=causal, q_doc=q_doc,
                                       k_doc=k_doc)
        ctx.save_for_backward(q, k, v, out, lse, q_doc, k_doc)
        ctx.scale, ctx.causal = scale, causal
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        q, k, v, out, lse, q_doc, k_doc = ctx.saved_tensors
        dq, dk, dv = flash_block_backward(dout, q, k, v, out, lse, scale=ctx.scale,
                                          causal=ctx.causal, q_doc=q_doc, k_doc=k_doc)
        return dq, dk, dv, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    scale: Optional[float] = None, causal: bool = True,
                    q_doc: Optional[torch.Tensor] = None,
                    k_doc: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention with a Triton forward and backward.

    q [B, T, Hq, D], k/v [B, Tk, Hkv, D] with Hq % Hkv == 0 (GQA / MQA without expanding
    k/v), D in {16, 32, 64, 128}, dtype fp16/bf16/fp32 (fp32 accumulation). `scale` defaults
    to 1/sqrt(D). `causal` lets query i see keys j <= i; q_doc [B, T] / k_doc [B, Tk]
    (int32/int64) restrict attention to equal document ids (packed sequences). Returns out
    [B, T, Hq, D] in q's dtype; rows with no allowed key are 0. Differentiable in q, k, v.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return FlashAttentionFunction.apply(q, k, v, scale, causal, q_doc, k_doc)
