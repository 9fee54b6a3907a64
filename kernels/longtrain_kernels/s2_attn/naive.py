"""Obviously-right dense reference for S2-Attention: an explicit mask and a plain softmax.

Legend: B batch, Tq query rows, Tk keys, Hq query heads, Hkv key/value heads (query head h
reads key/value head h // (Hq // Hkv)), D head dim. `q_bthd` [B, Tq, Hq, D], `lse_bht`
[B, Hq, Tq], `mask_bhqk` [B or 1, Hq, Tq, Tk]. O(Tq * Tk) memory: for tests only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from longtrain_kernels.s2_attn.pattern import S2Pattern


def s2_mask(pattern: S2Pattern, tq: int, tk: int, *, num_q_heads: int, head_offset: int = 0,
            q_start: int = 0, q_doc: Optional[torch.Tensor] = None,
            k_doc: Optional[torch.Tensor] = None,
            device: Optional[torch.device] = None) -> torch.Tensor:
    """Bool [B or 1, Hq, Tq, Tk]: query row i (position q_start + i) may see key position s."""
    bs = pattern.block_size
    q_pos = q_start + torch.arange(tq, device=device)
    k_pos = torch.arange(tk, device=device)
    heads = range(head_offset, head_offset + num_q_heads)
    blocks = pattern.block_mask(-(-tq // bs), -(-tk // bs), heads,
                                q_block_offset=q_start // bs).to(device)
    # q_start is a multiple of bs, so row i lies in local query block i // bs.
    allowed = blocks[:, q_pos // bs - q_start // bs][:, :, k_pos // bs]
    allowed = (allowed & (k_pos[None, :] <= q_pos[:, None]))[None]
    if (q_doc is None) != (k_doc is None):
        raise ValueError("q_doc and k_doc must be given together")
    if q_doc is not None:
        allowed = allowed & (q_doc[:, None, :, None] == k_doc[:, None, None, :])
    return allowed


def s2_reference_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: S2Pattern, *,
                     head_offset: int = 0, q_start: int = 0, scale: Optional[float] = None,
                     q_doc: Optional[torch.Tensor] = None,
                     k_doc: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Tq, Hq, D], lse [B, Hq, Tq]) in q's dtype by dense masked softmax.

    Differentiable by autograd. Rows with no allowed key would give NaN; the pattern always
    allows the diagonal, so they do not occur.
    """
    hq = q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k = k.repeat_interleave(hq // k.shape[2], dim=2)
    v = v.repeat_interleave(hq // v.shape[2], dim=2)
    s_bhqk = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    mask = s2_mask(pattern, q.shape[1], k.shape[1], num_q_heads=hq, head_offset=head_offset,
                   q_start=q_start, q_doc=q_doc, k_doc=k_doc, device=q.device)
    s_bhqk = s_bhqk.masked_fill(~mask, float("-inf"))
    lse_bht = torch.logsumexp(s_bhqk, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(s_bhqk - lse_bht[..., None]), v)
    return out, lse_bht


def s2_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: S2Pattern, *,
                 head_offset: int = 0, q_start: int = 0, scale: Optional[float] = None,
                 q_doc: Optional[torch.Tensor] = None,
                 k_doc: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out [B, Tq, Hq, D] of `s2_attention` by dense masked softmax (any dtype; autograd)."""
    return s2_reference_lse(q, k, v, pattern, head_offset=head_offset, q_start=q_start,
                            scale=scale, q_doc=q_doc, k_doc=k_doc)[0]
