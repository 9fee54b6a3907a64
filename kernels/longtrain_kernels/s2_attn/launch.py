"""Host launchers for the S2-Attention Triton kernels: check, allocate, grid, launch.

Legend: B batch, Tq query rows, Tk keys, Hq query heads, Hkv key/value heads, D head dim.
Inputs and results are [B, H, T, D] views (as function.py passes them); the kernels take
batch / time / head strides, so the caller's [B, T, H, D] memory is used as it is and outputs
are allocated [B, T, H, D]. `lse_bht` is [B, Hq, Tq] float32. Arguments are checked in
function.py; no autograd here. Triton is imported inside the functions.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from longtrain_kernels._launch_common import (device_ctx, doc_args, dot_precision, empty,
                                              head_dim_last)
from longtrain_kernels.s2_attn.pattern import S2Pattern

_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_supports(q: torch.Tensor) -> bool:
    """Whether the kernels take q's head dim and dtype."""
    return q.shape[-1] in _HEAD_DIMS and q.dtype in _DTYPES


def check_triton_args(q: torch.Tensor) -> None:
    """ValueError unless the kernels support q's head dim and dtype."""
    if q.shape[-1] not in _HEAD_DIMS:
        raise ValueError(f"head dim D={q.shape[-1]} not supported by backend='triton'; use one "
                         f"of {_HEAD_DIMS}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"dtype {q.dtype} not supported by backend='triton'; use one of "
                         f"{_DTYPES}")


def _phases(pattern: S2Pattern, num_q_heads: int, head_offset: int,
            device: torch.device) -> torch.Tensor:
    """int32 [Hq]: each local head's vertical phase, -1 for a dense head."""
    phase = [-1 if pattern.is_dense_head(head_offset + h) else
             pattern.vertical_phase(head_offset + h) for h in range(num_q_heads)]
    return torch.tensor(phase, dtype=torch.int32, device=device)


def _strides(x_bhtd: torch.Tensor) -> tuple[int, int, int]:
    """(batch, time, head) strides of a [B, H, T, D] view."""
    return x_bhtd.stride(0), x_bhtd.stride(2), x_bhtd.stride(1)


def _warps(block: int) -> int:
    return 8 if block >= 128 else 4


def s2_forward(q_bhtd: torch.Tensor, k_bhtd: torch.Tensor, v_bhtd: torch.Tensor,
               pattern: S2Pattern, *, head_offset: int, q_start: int, scale: float,
               q_doc: Optional[torch.Tensor], k_doc: Optional[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Tq, D] view in q's dtype, lse [B, Hq, Tq] float32)."""
    from longtrain_kernels.s2_attn import kernel

    q, k, v = (head_dim_last(x) for x in (q_bhtd, k_bhtd, v_bhtd))
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    bs = pattern.block_size
    out_bthd = empty((b, tq, hq, d), like=q, dtype=q.dtype)
    lse_bht = empty((b, hq, tq), like=q, dtype=torch.float32)
    if out_bthd.numel() == 0:
        return out_bthd.transpose(1, 2), lse_bht
    out = out_bthd.transpose(1, 2)
    q_doc, k_doc, stride_qdb, stride_kdb, has_doc = doc_args(q_doc, k_doc, like=q)
    with device_ctx(q):
        kernel.s2_fwd_kernel[(tq // bs, b * hq)](
            q, k, v, out, lse_bht, q_doc, k_doc, _phases(pattern, hq, head_offset, q.device),
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), stride_qdb, stride_kdb,
            hq, tq, tk, q_start // bs, scale * math.log2(math.e),
            GROUP=hq // hkv, HEAD_DIM=d, BLOCK=bs, LOCAL=pattern.local_blocks,
            VERT=pattern.vert_stride, HAS_DOC=has_doc, DOT_PRECISION=dot_precision(q.dtype),
            num_warps=_warps(bs), num_stages=2)
    return out, lse_bht


def s2_backward(dout_bhtd: torch.Tensor, q_bhtd: torch.Tensor, k_bhtd: torch.Tensor,
                v_bhtd: torch.Tensor, out_bhtd: torch.Tensor, lse_bht: torch.Tensor,
                pattern: S2Pattern, *, head_offset: int, q_start: int, scale: float,
                q_doc: Optional[torch.Tensor], k_doc: Optional[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq [B, Hq, Tq, D], dk, dv [B, Hkv, Tk, D]) views in the inputs' dtype.

    Query blocks visit their allowed key blocks (dq); key blocks visit the query blocks that
    allow them (dk, dv summed over the GQA group in registers). No atomics.
    """
    from longtrain_kernels.flash_attn.kernel import flash_bwd_preprocess_kernel
    from longtrain_kernels.s2_attn import kernel

    q, k, v = (head_dim_last(x) for x in (q_bhtd, k_bhtd, v_bhtd))
    dout, out = head_dim_last(dout_bhtd.to(q.dtype)), head_dim_last(out_bhtd)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    bs = pattern.block_size
    dq = empty((b, tq, hq, d), like=q, dtype=q.dtype).transpose(1, 2)
    dk = empty((b, tk, hkv, d), like=k, dtype=k.dtype).transpose(1, 2)
    dv = empty((b, tk, hkv, d), like=v, dtype=v.dtype).transpose(1, 2)
    if b * hq * tq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse_bht.float().contiguous()
    delta_bht = torch.empty((b, hq, tq), dtype=torch.float32, device=q.device)
    lse2_bht = torch.empty((b, hq, tq), dtype=torch.float32, device=q.device)
    q_doc, k_doc, stride_qdb, stride_kdb, has_doc = doc_args(q_doc, k_doc, like=q)
    phase = _phases(pattern, hq, head_offset, q.device)
    qk_scale = scale * math.log2(math.e)
    consts = dict(GROUP=hq // hkv, HEAD_DIM=d, BLOCK=bs, LOCAL=pattern.local_blocks,
                  VERT=pattern.vert_stride, HAS_DOC=has_doc,
                  DOT_PRECISION=dot_precision(q.dtype), num_warps=_warps(bs), num_stages=2)
    with device_ctx(q):
        flash_bwd_preprocess_kernel[(math.ceil(tq / 64), b * hq)](
            out, dout, lse, delta_bht, lse2_bht, *_strides(out), *_strides(dout), hq, tq,
            HEAD_DIM=d, BLOCK_M=64)
        kernel.s2_bwd_dq_kernel[(tq // bs, b * hq)](
            q, k, v, dout, dq, lse2_bht, delta_bht, q_doc, k_doc, phase,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq),
            stride_qdb, stride_kdb, hq, tq, tk, q_start // bs, scale, qk_scale, **consts)
        kernel.s2_bwd_dkdv_kernel[(tk // bs, b * hkv)](
            q, k, v, dout, dk, dv, lse2_bht, delta_bht, q_doc, k_doc, phase,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk),
            *_strides(dv), stride_qdb, stride_kdb, hkv, tq, tk, q_start // bs, scale, qk_scale,
            **consts)
    return dq, dk, dv
