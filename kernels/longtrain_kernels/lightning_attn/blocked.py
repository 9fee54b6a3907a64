"""Blocked (chunked) PyTorch lightning attention: forward and hand-written backward.

Legend: B batch, T sequence length, H heads, Dk key/query dim, Dv value dim, C block size,
c the length of one block (C, or less for the last). Suffixes name layouts: `q_bhtd`
[B, H, T, Dk], `state_bhkv` [B, H, Dk, Dv], `mask_bhcc` [B or 1, H, c, c].

The same algorithm as the Triton kernels (see README.md), vectorised over batch and heads
and looping over blocks in Python: within a block the masked quadratic form, across blocks
a running [Dk, Dv] state. Memory is O(T * C + Dk * Dv) per (batch, head): nothing
[T, T]-sized exists. `seg_bt` are segment ids (contiguous runs numbered 0, 1, ...) or None.
No autograd here (see function.py).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

DEFAULT_BLOCK = 64


class _BlockWeights(NamedTuple):
    """Decay and document masks of one block [n0, n0 + c), e = n0 + c - 1."""

    # [s, j]: lambda^(s - j) where j <= s in the same document, else 0.
    mask_bhcc: torch.Tensor
    # [i]: lambda^(i + 1) where row i continues the document of position n0 - 1, else 0.
    into_bhc: torch.Tensor
    # [j]: lambda^(e - j) where key j is in the document of position e, else 0.
    out_of_bhc: torch.Tensor
    # lambda^c where the document of n0 - 1 runs through e, else 0.
    carry_bh11: torch.Tensor


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_weights(log_decay_h: torch.Tensor, seg_bt: Optional[torch.Tensor], n0: int,
                   n1: int) -> _BlockWeights:
    c = n1 - n0
    pos = torch.arange(c, device=log_decay_h.device, dtype=log_decay_h.dtype)
    diff_cc = pos[:, None] - pos[None, :]
    ld_h11 = log_decay_h[:, None, None]
    # clamp first: exp of the (masked-out) negative distances could overflow to inf.
    mask_hcc = torch.exp(ld_h11 * diff_cc.clamp(min=0)) * (diff_cc >= 0)
    into_hc = torch.exp(log_decay_h[:, None] * (pos + 1))
    out_of_hc = torch.exp(log_decay_h[:, None] * (c - 1 - pos))
    carry_h = torch.exp(log_decay_h * c)
    if seg_bt is None:
        return _BlockWeights(mask_hcc[None], into_hc[None], out_of_hc[None],
                             carry_h[None, :, None, None])
    seg_bc = seg_bt[:, n0:n1]
    # Segment of position n0 - 1; for the first block the state is 0 and any value does.
    prev_b = seg_bt[:, n0 - 1] if n0 > 0 else seg_bc[:, 0]
    same_b1cc = (seg_bc[:, :, None] == seg_bc[:, None, :])[:, None]
    cont_b1c = (seg_bc == prev_b[:, None])[:, None]
    last_b1c = (seg_bc == seg_bc[:, -1:])[:, None]
    carry_b111 = (seg_bc[:, -1] == prev_b)[:, None, None, None]
    return _BlockWeights(mask_hcc[None] * same_b1cc, into_hc[None] * cont_b1c,
                         out_of_hc[None] * last_b1c, carry_h[None, :, None, None] * carry_b111)


def _bhtd(x_bthd: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x_bthd.transpose(1, 2).to(dtype)


def blocked_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    log_decay: torch.Tensor, seg: Optional[torch.Tensor], *,
                    block_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, Dv] in q's dtype, state [B, H, Dk, Dv] float32 / float64)."""
    block = block_size or DEFAULT_BLOCK
    dtype = accumulate_dtype(q.dtype)
    q_bhtd, k_bhtd, v_bhtd = _bhtd(q, dtype), _bhtd(k, dtype), _bhtd(v, dtype)
    ld_h = log_decay.to(device=q.device, dtype=dtype)
    b, h, t, dk = q_bhtd.shape
    o_bhtd = q_bhtd.new_empty(b, h, t, v_bhtd.shape[-1])
    state_bhkv = q_bhtd.new_zeros(b, h, dk, v_bhtd.shape[-1])
    for n0 in range(0, t, block):
        n1 = min(n0 + block, t)
        w = _block_weights(ld_h, seg, n0, n1)
        qb, kb, vb = q_bhtd[:, :, n0:n1], k_bhtd[:, :, n0:n1], v_bhtd[:, :, n0:n1]
        o_bhtd[:, :, n0:n1] = ((qb @ kb.mT) * w.mask_bhcc) @ vb \
            + w.into_bhc[..., None] * (qb @ state_bhkv)
        state_bhkv = w.carry_bh11 * state_bhkv + (kb * w.out_of_bhc[..., None]).mT @ vb
    return o_bhtd.transpose(1, 2).to(q.dtype), state_bhkv


def blocked_backward(do: torch.Tensor, dstate: Optional[torch.Tensor], q: torch.Tensor,
                     k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                     seg: Optional[torch.Tensor], *, block_size: Optional[int] = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the input dtypes from do [B, T, H, Dv] and dstate [B, H, Dk, Dv]
    (None: zero). dq by a forward scan that recomputes the state; dk, dv by a reverse scan
    over the state gradient, which starts at dstate."""
    block = block_size or DEFAULT_BLOCK
    dtype = accumulate_dtype(q.dtype)
    q_bhtd, k_bhtd, v_bhtd = _bhtd(q, dtype), _bhtd(k, dtype), _bhtd(v, dtype)
    do_bhtd = _bhtd(do, dtype)
    ld_h = log_decay.to(device=q.device, dtype=dtype)
    b, h, t, dk = q_bhtd.shape
    dv_dim = v_bhtd.shape[-1]
    starts = list(range(0, t, block))

    dq_bhtd = torch.empty_like(q_bhtd)
    state_bhkv = q_bhtd.new_zeros(b, h, dk, dv_dim)
    for n0 in starts:
        n1 = min(n0 + block, t)
        w = _block_weights(ld_h, seg, n0, n1)
        kb, vb, dob = k_bhtd[:, :, n0:n1], v_bhtd[:, :, n0:n1], do_bhtd[:, :, n0:n1]
        dq_bhtd[:, :, n0:n1] = ((dob @ vb.mT) * w.mask_bhcc) @ kb \
            + w.into_bhc[..., None] * (dob @ state_bhkv.mT)
        state_bhkv = w.carry_bh11 * state_bhkv + (kb * w.out_of_bhc[..., None]).mT @ vb

    dk_bhtd, dv_bhtd = torch.empty_like(k_bhtd), torch.empty_like(v_bhtd)
    if dstate is None:
        dstate_bhkv = q_bhtd.new_zeros(b, h, dk, dv_dim)
    else:
        dstate_bhkv = dstate.to(dtype)
    for n0 in reversed(starts):
        n1 = min(n0 + block, t)
        w = _block_weights(ld_h, seg, n0, n1)
        qb, kb, vb = q_bhtd[:, :, n0:n1], k_bhtd[:, :, n0:n1], v_bhtd[:, :, n0:n1]
        dob = do_bhtd[:, :, n0:n1]
        # Rows s are the later (query) positions, columns j the keys.
        dov_bhcc = (dob @ vb.mT) * w.mask_bhcc
        qk_bhcc = (qb @ kb.mT) * w.mask_bhcc
        out_of = w.out_of_bhc[..., None]
        dk_bhtd[:, :, n0:n1] = dov_bhcc.mT @ qb + out_of * (vb @ dstate_bhkv.mT)
        dv_bhtd[:, :, n0:n1] = qk_bhcc.mT @ dob + out_of * (kb @ dstate_bhkv)
        dstate_bhkv = w.carry_bh11 * dstate_bhkv + (qb * w.into_bhc[..., None]).mT @ dob
    return (dq_bhtd.transpose(1, 2).to(q.dtype), dk_bhtd.transpose(1, 2).to(k.dtype),
            dv_bhtd.transpose(1, 2).to(v.dtype))
