"""Dense softmax attention on the whole (unsharded) sequence: torch SDPA, per document when
the sequence is packed.

Legend: B batch, T sequence, H heads, D head dim. It is also the reference every
context-parallel backend is tested against.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from longtrain.attention.segments import segment_pairs
from longtrain.attention.types import AttentionContext, AttentionMeta, BackendSpec
from longtrain.observability.flops import layer_attention_forward
from longtrain.parallel.collective_cost import AttentionShape, Link


def dense_attention(q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor,
                    meta: AttentionMeta, ctx: AttentionContext) -> torch.Tensor:
    """Softmax attention with GQA, causal, and packed documents (each document attends within
    its own run of tokens: no [T, T] mask). Shapes as in attention.types."""
    if ctx.cp_size != 1:
        raise ValueError(f"attention.backend='dense' cannot run with parallel.cp={ctx.cp_size}")
    q_bhtd, k_bhtd, v_bhtd = (x.transpose(1, 2) for x in (q_bthd, k_bthd, v_bthd))
    gqa = q_bhtd.shape[1] != k_bhtd.shape[1]

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=meta.causal,
                                              scale=meta.softmax_scale, enable_gqa=gqa)

    doc = meta.doc_ids_bt
    if doc is None:
        return attend(q_bhtd, k_bhtd, v_bhtd).transpose(1, 2)
    rows = []
    for b in range(q_bhtd.shape[0]):
        one = slice(b, b + 1)
        parts = [attend(q_bhtd[one, :, qs], k_bhtd[one, :, ks], v_bhtd[one, :, ks])
                 for qs, ks in segment_pairs(doc[b], doc[b])]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out_bhtd = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
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
