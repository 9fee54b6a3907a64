"""Obviously-right PyTorch reference for one block of attention with its log-sum-exp.

Legend: B batch, Tq query rows and Tk key columns of this block, Hq query heads, Hkv key/value
heads (Hq % Hkv == 0; query head h reads key/value head h // (Hq // Hkv)), D head dim.
Suffixes name the layout: `q_bthd` is [B, Tq, Hq, D], `lse_bht` is [B, Hq, Tq], `s_bhqk` is
[B, Hq, Tq, Tk].

Everything is computed in float64 from an explicit masked score matrix; the kernels in this
folder are tested against these two functions.
"""

from __future__ import annotations

from typing import Optional

import torch


def allowed_mask(tq: int, tk: int, *, causal: bool, q_offset: int, k_offset: int,
                 q_doc: Optional[torch.Tensor], k_doc: Optional[torch.Tensor],
                 device: torch.device) -> torch.Tensor:
    """Bool [B or 1, 1, Tq, Tk]: True where query row i may attend to key column j."""
    allowed = torch.ones(1, tq, tk, dtype=torch.bool, device=device)
    if causal:
        q_pos = q_offset + torch.arange(tq, device=device)
        k_pos = k_offset + torch.arange(tk, device=device)
        allowed = allowed & (k_pos[None, :] <= q_pos[:, None])[None]
    if (q_doc is None) != (k_doc is None):
        raise ValueError("q_doc and k_doc must be given together "
                         f"(q_doc is {'set' if q_doc is not None else 'None'}, "
                         f"k_doc is {'set' if k_doc is not None else 'None'})")
    if q_doc is not None:
        allowed = allowed & (q_doc[:, :, None] == k_doc[:, None, :])
    return allowed[:, None]


def _expand_kv(x_bthd: torch.Tensor, hq: int) -> torch.Tensor:
    """[B, Tk, Hkv, D] -> [B, Tk, Hq, D]: query head h reads key/value head h // (Hq // Hkv)."""
    return x_bthd.repeat_interleave(hq // x_bthd.shape[2], dim=2)


def _probs(q_bthd: torch.Tensor, k_bthd: torch.Tensor, lse_bht: Optional[torch.Tensor], *,
           scale: float, causal: bool, q_offset: int, k_offset: int,
           q_doc: Optional[torch.Tensor], k_doc: Optional[torch.Tensor]
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked scores s_bhqk with -inf, allowed mask, P = exp(s - lse) or None) in float64."""
    hq = q_bthd.shape[2]
    q64 = q_bthd.double()
    k64 = _expand_kv(k_bthd.double(), hq)
    s_bhqk = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * scale
    allowed = allowed_mask(q_bthd.shape[1], k_bthd.shape[1], causal=causal, q_offset=q_offset,
                           k_offset=k_offset, q_doc=q_doc, k_doc=k_doc, device=q_bthd.device)
    s_bhqk = s_bhqk.masked_fill(~allowed, float("-inf"))
    if lse_bht is None:
        return s_bhqk, allowed, None
    lse64 = lse_bht.double()[..., None]
    # A row with lse -inf has no allowed key anywhere: its probabilities are 0, not NaN.
    keep = allowed & torch.isfinite(lse64)
    p_bhqk = torch.where(keep, torch.exp(s_bhqk - torch.where(keep, lse64, 0.0)), 0.0)
    return s_bhqk, allowed, p_bhqk


def attention_block_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                          causal: bool = False, q_offset: int = 0, k_offset: int = 0,
                          q_doc: Optional[torch.Tensor] = None,
                          k_doc: Optional[torch.Tensor] = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Tq, Hq, D] in q's dtype, lse [B, Hq, Tq]) of one attention block.

    q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D]. Query row i sits at global position q_offset + i,
    key column j at k_offset + j; `causal` allows key position <= query position; document
    ids q_doc [B, Tq] / k_doc [B, Tk] allow only equal ids. lse is the natural-log
    log-sum-exp of scale * q.k over the allowed keys: float32, or float64 for float64 inputs.
    Rows with no allowed key get out 0 and lse -inf.
    """
    s_bhqk, _, _ = _probs(q, k, None, scale=scale, causal=causal, q_offset=q_offset,
                          k_offset=k_offset, q_doc=q_doc, k_doc=k_doc)
    lse_bht = torch.logsumexp(s_bhqk, dim=-1)
    _, _, p_bhqk = _probs(q, k, lse_bht, scale=scale, causal=causal, q_offset=q_offset,
                          k_offset=k_offset, q_doc=q_doc, k_doc=k_doc)
    v64 = _expand_kv(v.double(), q.shape[2])
    out_bthd = torch.einsum("bhqk,bkhd->bqhd", p_bhqk, v64)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out_bthd.to(q.dtype), lse_bht.to(lse_dtype)


def attention_block_naive_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                   v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
                                   scale: float, causal: bool = False, q_offset: int = 0,
                                   k_offset: int = 0, q_doc: Optional[torch.Tensor] = None,
                                   k_doc: Optional[torch.Tensor] = None
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq [B, Tq, Hq, D], dk, dv [B, Tk, Hkv, D]) of one block, in the inputs' dtypes.

    `out` [B, Tq, Hq, D] and `lse` [B, Hq, Tq] may be the merged (global) output and lse of the
    query rows over all blocks; the block's probabilities are then exp(scale q.k - lse), and
    the per-block gradients sum to the gradient of the whole attention. Rows with lse -inf
    contribute nothing.
    """
    b, tk, hkv, d = k.shape
    hq = q.shape[2]
    _, _, p_bhqk = _probs(q, k, lse, scale=scale, causal=causal, q_offset=q_offset,
                          k_offset=k_offset, q_doc=q_doc, k_doc=k_doc)
    do64, o64 = dout.double(), out.double()
    k64, v64 = _expand_kv(k.double(), hq), _expand_kv(v.double(), hq)
    dv_bthd = torch.einsum("bhqk,bqhd->bkhd", p_bhqk, do64)
    dp_bhqk = torch.einsum("bqhd,bkhd->bhqk", do64, v64)
    delta_bhq = (do64 * o64).sum(-1).transpose(1, 2)
    ds_bhqk = p_bhqk * (dp_bhqk - delta_bhq[..., None])
    dq_bthd = scale * torch.einsum("bhqk,bkhd->bqhd", ds_bhqk, k64)
    dk_bthd = scale * torch.einsum("bhqk,bqhd->bkhd", ds_bhqk, q.double())
    # GQA: a key/value head's gradient sums over the query heads of its group.
    dk_bthd = dk_bthd.reshape(b, tk, hkv, hq // hkv, d).sum(3)
    dv_bthd = dv_bthd.reshape(b, tk, hkv, hq // hkv, d).sum(3)
    return dq_bthd.to(q.dtype), dk_bthd.to(k.dtype), dv_bthd.to(v.dtype)
