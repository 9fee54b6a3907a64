"""Dense softmax attention on the whole (unsharded) sequence: torch SDPA.

Legend: B batch, T sequence, H heads, D head dim. It is also the reference every
context-parallel backend is tested against.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from longtrain.attention.types import AttentionContext, AttentionMeta, BackendSpec
from longtrain.observability.flops import layer_attention_forward
from longtrain.parallel.collective_cost import AttentionShape, Link


def document_causal_mask(doc_ids_bt: torch.Tensor, *, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, T, T]: 0 where query t may see key s, -inf elsewhere."""
    same_doc_btt = doc_ids_bt[:, :, None] == doc_ids_bt[:, None, :]
    if causal:
        t = doc_ids_bt.shape[1]
        same_doc_btt = same_doc_btt & torch.ones(t, t, dtype=torch.bool, device=doc_ids_bt.device).tril()
    mask = torch.zeros(same_doc_btt.shape, dtype=dtype, device=doc_ids_bt.device)
    mask.masked_fill_(~same_doc_btt, float("-inf"))
    return mask[:, None]


def dense_attention(q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor,
                    meta: AttentionMeta, ctx: AttentionContext) -> torch.Tensor:
    """Softmax attention with GQA, causal and document masks. Shapes as in attention.types."""
    if ctx.cp_size != 1:
        raise ValueError(f"attention.backend='dense' cannot run with parallel.cp={ctx.cp_size}")
    q_bhtd, k_bhtd, v_bhtd = (x.transpose(1, 2) for x in (q_bthd, k_bthd, v_bthd))
    gqa = q_bhtd.shape[1] != k_bhtd.shape[1]
    if meta.doc_ids_bt is not None:
        mask = document_causal_mask(meta.doc_ids_bt, causal=meta.causal, dtype=q_bhtd.dtype)
        out_bhtd = F.scaled_dot_product_attention(q_bhtd, k_bhtd, v_bhtd, attn_mask=mask,
                                                  scale=meta.softmax_scale, enable_gqa=gqa)
    else:
        out_bhtd = F.scaled_dot_product_attention(q_bhtd, k_bhtd, v_bhtd, is_causal=meta.causal,
                                                  scale=meta.softmax_scale, enable_gqa=gqa)
    return out_bhtd.transpose(1, 2)


def softmax_forward_flops(*, t: int, heads: int, head_dim: int, attention: Any) -> float:
    """Causal softmax attention: what every exact softmax backend computes."""
    return layer_attention_forward("softmax", t=t, heads=heads, head_dim=head_dim)


def no_comm(s: AttentionShape, *, c: int, link: Link, fwd_attention_s: float, attention: Any
            ) -> tuple[float, Optional[Any]]:
    return 0.0, None


SPEC = BackendSpec(name="dense", kind="softmax", shards_sequence=False,
                   build=lambda attention, model: dense_attention,
                   forward_flops=softmax_forward_flops, comm=no_comm)
