"""Obviously-right PyTorch reference: the serial recurrence, token by token, in float64.

Legend: B batch, T sequence length, H heads, Dk key/query dim, Dv value dim. Suffixes name
the layout: `q_bthd` [B, T, H, Dk], `state_bhkv` [B, H, Dk, Dv].

    S_t = lambda_h * S_{t-1} * [doc_t == doc_{t-1}] + k_t^T v_t,    o_t = q_t S_t

with lambda_h = exp(log_decay[h]) and S_{-1} = 0; the returned state is S_{T-1}. The tests
compare the blocked PyTorch path and the Triton kernels (outputs and autograd gradients of
this function) against it.
"""

from __future__ import annotations

from typing import Optional

import torch


def lightning_attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              log_decay: torch.Tensor, doc_ids: Optional[torch.Tensor] = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, Dv], state [B, H, Dk, Dv]), both float64; differentiable by autograd.

    q, k [B, T, H, Dk], v [B, T, H, Dv], log_decay [H] (<= 0), doc_ids [B, T] or None. The
    state restarts from 0 wherever doc_ids changes from one token to the next.
    """
    q_bthd, k_bthd, v_bthd = q.double(), k.double(), v.double()
    b, t, h, dk = q_bthd.shape
    lam_h = torch.exp(log_decay.double().to(q.device))
    state_bhkv = q_bthd.new_zeros(b, h, dk, v_bthd.shape[-1])
    outs = []
    for i in range(t):
        keep_bhkv = lam_h[None, :, None, None].expand(b, h, 1, 1)
        if doc_ids is not None and i > 0:
            same_b = (doc_ids[:, i] == doc_ids[:, i - 1]).double()
            keep_bhkv = keep_bhkv * same_b[:, None, None, None]
        kv_bhkv = k_bthd[:, i, :, :, None] * v_bthd[:, i, :, None, :]
        state_bhkv = keep_bhkv * state_bhkv + kv_bhkv
        outs.append(torch.einsum("bhk,bhkv->bhv", q_bthd[:, i], state_bhkv))
    o_bthd = torch.stack(outs, dim=1) if outs else v_bthd.new_zeros(b, 0, h, v_bthd.shape[-1])
    return o_bthd, state_bhkv
