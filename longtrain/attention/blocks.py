"""One block of attention with its log-sum-exp: the unit ring attention is made of.

Legend: B batch, H heads (Hq query, Hkv key/value; GQA when they differ), Tq query rows and
Tk key columns of this block, D head dim. Tensors here are `[B, H, T, D]` (heads before
time, as the fused kernels want them); LSE is `[B, Hq, Tq]` float32.

`block_forward` returns (out, lse) where rows with no allowed key have out 0 and lse -inf,
so blocks merge with `merge_block_` whatever order they arrive in. `block_backward` takes the
*merged* (global) out and lse, which is what makes per-block gradients sum to the exact
gradient of the whole attention.

On CPU the blocks run on ATen's fused flash kernel for CPU (which accepts GQA), with packed
documents once per document's runs of query rows and key columns (no [Tq, Tk] mask); on CUDA on our Triton kernel when available, else on the plain PyTorch reference.
`kernels` (auto | triton | torch, the `train.kernels` setting) can force either.
"""

from __future__ import annotations

from typing import Optional

import torch

from longtrain.attention.segments import segment_pairs
from longtrain_kernels import resolve_kernels
from longtrain_kernels.flash_attn import flash_block_backward, flash_block_forward
from longtrain_kernels.flash_attn.naive import (attention_block_naive,
                                                attention_block_naive_backward)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merging and accumulation precision: float32, or float64 for float64 inputs (tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cpu_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                 causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, scale=scale)
    return out, lse.to(acc_dtype(q.dtype))


def _segments_forward(q_bhtd: torch.Tensor, k_bhtd: torch.Tensor, v_bhtd: torch.Tensor, *,
                      scale: float, causal: bool, q_doc_bt: torch.Tensor,
                      k_doc_bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A block over packed documents on CPU: the fused kernel on each document's query and
    key runs (`segments.segment_pairs`), no [Tq, Tk] mask; rows whose document has no key
    here keep out 0 and lse -inf. `causal` (a diagonal block: the same tokens on both sides)
    applies within each document."""
    b, hq, tq, d = q_bhtd.shape
    out = q_bhtd.new_zeros(b, hq, tq, v_bhtd.shape[-1])
    lse = torch.full((b, hq, tq), float("-inf"), dtype=acc_dtype(q_bhtd.dtype),
                     device=q_bhtd.device)
    for i in range(b):
        for qs, ks in segment_pairs(q_doc_bt[i], k_doc_bt[i]):
            o, l_ = _cpu_forward(q_bhtd[i:i + 1, :, qs], k_bhtd[i:i + 1, :, ks],
                                 v_bhtd[i:i + 1, :, ks], scale=scale, causal=causal)
            out[i:i + 1, :, qs] = o
            lse[i:i + 1, :, qs] = l_
    return out, lse


def _segments_backward(dout_bhtd: torch.Tensor, q_bhtd: torch.Tensor, k_bhtd: torch.Tensor,
                       v_bhtd: torch.Tensor, out_bhtd: torch.Tensor, lse_bht: torch.Tensor, *,
                       scale: float, causal: bool, q_doc_bt: torch.Tensor,
                       k_doc_bt: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of `_segments_forward`, document by document (each query row and each key
    column belongs to one document, so the pieces are disjoint)."""
    dq, dk, dv = torch.zeros_like(q_bhtd), torch.zeros_like(k_bhtd), torch.zeros_like(v_bhtd)
    for i in range(q_bhtd.shape[0]):
        one = slice(i, i + 1)
        for qs, ks in segment_pairs(q_doc_bt[i], k_doc_bt[i]):
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout_bhtd[one, :, qs], q_bhtd[one, :, qs], k_bhtd[one, :, ks],
                v_bhtd[one, :, ks], out_bhtd[one, :, qs], lse_bht[one, :, qs].contiguous(),
                0.0, causal, scale=scale)
            dq[one, :, qs] = gq
            dk[one, :, ks] = gk
            dv[one, :, ks] = gv
    return dq, dk, dv


def _use_triton(q: torch.Tensor, kernels: str) -> bool:
    return resolve_kernels(kernels, q) == "triton"


def block_forward(q_bhtd: torch.Tensor, k_bhtd: torch.Tensor, v_bhtd: torch.Tensor, *,
                  scale: float, causal: bool, q_doc_bt: Optional[torch.Tensor] = None,
                  k_doc_bt: Optional[torch.Tensor] = None, kernels: str = "auto"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Tq, D] input dtype, lse [B, Hq, Tq] float32) of one block.

    `causal` masks key j > query i within the block (square blocks on the diagonal only).
    """
    if _use_triton(q_bhtd, kernels):
        out_bthd, lse = flash_block_forward(
            q_bhtd.transpose(1, 2), k_bhtd.transpose(1, 2), v_bhtd.transpose(1, 2), scale=scale,
            causal=causal, q_offset=0, k_offset=0, q_doc=q_doc_bt, k_doc=k_doc_bt)
        return out_bthd.transpose(1, 2), lse
    if q_bhtd.device.type != "cpu":
        return _naive_forward(q_bhtd, k_bhtd, v_bhtd, scale=scale, causal=causal,
                              q_doc_bt=q_doc_bt, k_doc_bt=k_doc_bt)
    if q_doc_bt is None:
        return _cpu_forward(q_bhtd, k_bhtd, v_bhtd, scale=scale, causal=causal)
    return _segments_forward(q_bhtd, k_bhtd, v_bhtd, scale=scale, causal=causal,
                             q_doc_bt=q_doc_bt, k_doc_bt=k_doc_bt)


def block_backward(dout_bhtd: torch.Tensor, q_bhtd: torch.Tensor, k_bhtd: torch.Tensor,
                   v_bhtd: torch.Tensor, out_bhtd: torch.Tensor, lse_bht: torch.Tensor, *,
                   scale: float, causal: bool, q_doc_bt: Optional[torch.Tensor] = None,
                   k_doc_bt: Optional[torch.Tensor] = None, kernels: str = "auto"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one block given the merged out and lse of the query rows."""
    if _use_triton(q_bhtd, kernels):
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        dq, dk, dv = flash_block_backward(
            t(dout_bhtd), t(q_bhtd), t(k_bhtd), t(v_bhtd), t(out_bhtd), lse_bht, scale=scale,
            causal=causal, q_offset=0, k_offset=0, q_doc=q_doc_bt, k_doc=k_doc_bt)
        return t(dq), t(dk), t(dv)
    if q_bhtd.device.type != "cpu":
        return _naive_backward(dout_bhtd, q_bhtd, k_bhtd, v_bhtd, out_bhtd, lse_bht, scale=scale,
                               causal=causal, q_doc_bt=q_doc_bt, k_doc_bt=k_doc_bt)
    lse = lse_bht.to(acc_dtype(q_bhtd.dtype))
    if q_doc_bt is None:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout_bhtd, q_bhtd, k_bhtd, v_bhtd, out_bhtd, lse, 0.0, causal, scale=scale)
    return _segments_backward(dout_bhtd, q_bhtd, k_bhtd, v_bhtd, out_bhtd, lse, scale=scale,
                              causal=causal, q_doc_bt=q_doc_bt, k_doc_bt=k_doc_bt)


def any_allowed(q_doc_bt: Optional[torch.Tensor], k_doc_bt: Optional[torch.Tensor]) -> bool:
    """False when no query of the block shares a document with any key: skip the block."""
    if q_doc_bt is None or k_doc_bt is None:
        return True
    # Documents are contiguous runs, so comparing the id sets is enough.
    return bool(torch.isin(q_doc_bt.reshape(-1), k_doc_bt.reshape(-1)).any())


def merge_block_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor,
                 lse_blk: torch.Tensor) -> None:
    """Online-softmax merge of a block into the accumulators, in place and in their precision
    (float32, or float64 for float64): out [B, H, T, D], lse [B, H, T] (views are fine)."""
    lse_new = torch.logaddexp(lse_acc, lse_blk)
    # Rows still without any key keep lse -inf; shift them by 0 so the weights are 0, not NaN.
    shift = torch.where(torch.isinf(lse_new), torch.zeros_like(lse_new), lse_new)
    w_acc = torch.exp(lse_acc - shift)[..., None]
    w_blk = torch.exp(lse_blk - shift)[..., None]
    # two passes over out_acc and no temporary of its size
    out_acc.mul_(w_acc).addcmul_(out_blk, w_blk.to(out_acc.dtype))
    lse_acc.copy_(lse_new)


def _naive_forward(q_bhtd: torch.Tensor, k_bhtd: torch.Tensor, v_bhtd: torch.Tensor, *,
                   scale: float, causal: bool, q_doc_bt: Optional[torch.Tensor],
                   k_doc_bt: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    out, lse = attention_block_naive(t(q_bhtd), t(k_bhtd), t(v_bhtd), scale=scale, causal=causal,
                                     q_doc=q_doc_bt, k_doc=k_doc_bt)
    return t(out), lse.to(acc_dtype(q_bhtd.dtype))


def _naive_backward(dout_bhtd: torch.Tensor, q_bhtd: torch.Tensor, k_bhtd: torch.Tensor,
                    v_bhtd: torch.Tensor, out_bhtd: torch.Tensor, lse_bht: torch.Tensor, *,
                    scale: float, causal: bool, q_doc_bt: Optional[torch.Tensor],
                    k_doc_bt: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    dq, dk, dv = attention_block_naive_backward(
        t(dout_bhtd), t(q_bhtd), t(k_bhtd), t(v_bhtd), t(out_bhtd), lse_bht, scale=scale,
        causal=causal, q_doc=q_doc_bt, k_doc=k_doc_bt)
    return t(dq), t(dk), t(dv)
