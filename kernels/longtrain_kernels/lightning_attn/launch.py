"""Host launchers for the lightning-attention kernels: check, allocate, grid, launch.

Legend: B batch, T sequence length, H heads, Dk / Dv key and value dims. Suffixes name
layouts: `q_bthd` [B, T, H, Dk], `state_bhkv` [B, H, Dk, Dv], `seg_bt` [B, T]. No autograd
here (see function.py). Triton is imported inside the functions, so this module imports on
machines without it.
"""

from __future__ import annotations

from typing import Optional

import torch

from longtrain_kernels._launch_common import (check_pow2_at_least_16, device_ctx,
                                              dot_precision, empty, head_dim_last)

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_BLOCK = 64
# Column slices of the state one program holds: at most 64 x 128 float32 in registers.
_MAX_BLOCK_COLS = 64

def _column_block(name: str, block: Optional[int], *, dim_name: str, dim: int) -> int:
    """The state columns one program holds: `block` (checked) or the default for `dim`."""
    block = block or min(dim, _MAX_BLOCK_COLS)
    check_pow2_at_least_16(name, block)
    if block > dim:
        raise ValueError(f"{name}={block} must be <= {dim_name}={dim}")
    return block


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True where the kernels handle these dims and dtypes (shapes already checked)."""
    return (q.dtype in DTYPES and q.dtype == k.dtype == v.dtype
            and q.shape[-1] in HEAD_DIMS and v.shape[-1] in HEAD_DIMS)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
           seg: Optional[torch.Tensor], *, block_size: int) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k [B, T, H, Dk] and v [B, T, H, Dv]; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not supports(q, k, v):
        raise ValueError(f"kernels need Dk, Dv in {HEAD_DIMS} and one q/k/v dtype of "
                         f"{DTYPES}; got q {tuple(q.shape)} {q.dtype}, k {k.dtype}, "
                         f"v {tuple(v.shape)} {v.dtype}")
    if log_decay.shape != (q.shape[2], ) or log_decay.dtype != torch.float32:
        raise ValueError(f"log_decay must be float32 [H] = [{q.shape[2]}]; got "
                         f"{tuple(log_decay.shape)} {log_decay.dtype}")
    if seg is not None and (seg.shape != q.shape[:2] or seg.dtype != torch.int32):
        raise ValueError(f"seg must be int32 [B, T] = {tuple(q.shape[:2])}; got "
                         f"{tuple(seg.shape)} {seg.dtype}")
    check_pow2_at_least_16("block_size", block_size)


def _seg_arg(seg: Optional[torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, int]:
    if seg is None:
        return torch.zeros(1, dtype=torch.int32, device=like.device), 0
    seg = seg.contiguous()
    return seg, seg.stride(0)


def lightning_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      log_decay: torch.Tensor, seg: Optional[torch.Tensor], *,
                      block_size: Optional[int] = None, block_dv: Optional[int] = None,
                      num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, Dv] in q's dtype, state [B, H, Dk, Dv] float32).

    q, k [B, T, H, Dk], v [B, T, H, Dv] (fp16/bf16/fp32, head dim contiguous), log_decay
    [H] float32, seg [B, T] int32 segment ids (contiguous runs) or None. One program per
    (batch, head, block_dv value columns).
    """
    block_size = block_size or DEFAULT_BLOCK
    _check(q, k, v, log_decay, seg, block_size=block_size)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    block_dv = _column_block("block_dv", block_dv, dim_name="Dv", dim=dv)
    from longtrain_kernels.lightning_attn import kernel

    q, k, v = head_dim_last(q), head_dim_last(k), head_dim_last(v)
    o_bthd = empty((b, t, h, dv), like=q, dtype=q.dtype)
    state_bhkv = empty((b, h, dk, dv), like=q, dtype=torch.float32)
    if t == 0:
        return o_bthd, state_bhkv.zero_()
    if b * h == 0:
        return o_bthd, state_bhkv
    seg, stride_segb = _seg_arg(seg, q)
    log_decay = log_decay.contiguous()
    with device_ctx(q):
        kernel.lightning_fwd_kernel[(b * h, dv // block_dv)](
            q, k, v, o_bthd, state_bhkv, log_decay, seg,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o_bthd.stride(0), o_bthd.stride(1), o_bthd.stride(2), stride_segb, h, t,
            DK=dk, DV=dv, BLOCK=block_size, BLOCK_DV=block_dv, HAS_DOC=seg.dim() == 2,
            DOT_PRECISION=dot_precision(q.dtype), num_warps=num_warps)
    return o_bthd, state_bhkv


def lightning_backward(do: torch.Tensor, dstate: Optional[torch.Tensor], q: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                       seg: Optional[torch.Tensor], *, block_size: Optional[int] = None,
                       block_dk: Optional[int] = None, block_dv: Optional[int] = None,
                       num_warps: int = 4
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the input dtypes.

    do [B, T, H, Dv] (cast to q's dtype), dstate [B, H, Dk, Dv] (any float dtype; None for
    zero) the gradient of the returned state. dq: a forward scan per (batch, head, block_dk
    key columns); dk: a reverse scan over the state gradient per (batch, head, block_dk key
    columns); dv: the same per (batch, head, block_dv value columns).
    """
    block_size = block_size or DEFAULT_BLOCK
    _check(q, k, v, log_decay, seg, block_size=block_size)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    block_dk = _column_block("block_dk", block_dk, dim_name="Dk", dim=dk)
    block_dv = _column_block("block_dv", block_dv, dim_name="Dv", dim=dv)
    if do.shape != v.shape:
        raise ValueError(f"do {tuple(do.shape)} must match v {tuple(v.shape)}")
    if dstate is not None and dstate.shape != (b, h, dk, dv):
        raise ValueError(f"dstate {tuple(dstate.shape)} must be [B, H, Dk, Dv] = "
                         f"{(b, h, dk, dv)}")
    from longtrain_kernels.lightning_attn import kernel

    q, k, v = head_dim_last(q), head_dim_last(k), head_dim_last(v)
    do = head_dim_last(do.to(q.dtype))
    dq_bthd = empty((b, t, h, dk), like=q, dtype=q.dtype)
    dk_bthd = empty((b, t, h, dk), like=k, dtype=k.dtype)
    dv_bthd = empty((b, t, h, dv), like=v, dtype=v.dtype)
    if t == 0 or b * h == 0:
        return dq_bthd, dk_bthd, dv_bthd
    seg, stride_segb = _seg_arg(seg, q)
    has_doc = seg.dim() == 2
    has_dstate = dstate is not None
    dstate_bhkv = dstate.float().contiguous() if has_dstate else seg
    log_decay = log_decay.contiguous()
    precision = dot_precision(q.dtype)
    with device_ctx(q):
        kernel.lightning_bwd_dq_kernel[(b * h, dk // block_dk)](
            k, v, do, dq_bthd, log_decay, seg,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dq_bthd.stride(0), dq_bthd.stride(1), dq_bthd.stride(2), stride_segb, h, t,
            DV=dv, BLOCK=block_size, BLOCK_DK=block_dk, HAS_DOC=has_doc,
            DOT_PRECISION=precision, num_warps=num_warps)
        # dk scans key columns against v, dv value columns against k.
        for kv, grad_bthd, block, want_dk in ((v, dk_bthd, block_dk, True),
                                              (k, dv_bthd, block_dv, False)):
            kernel.lightning_bwd_dkv_kernel[(b * h, grad_bthd.shape[-1] // block)](
                q, kv, do, dstate_bhkv, grad_bthd, log_decay, seg,
                q.stride(0), q.stride(1), q.stride(2),
                kv.stride(0), kv.stride(1), kv.stride(2),
                do.stride(0), do.stride(1), do.stride(2),
                grad_bthd.stride(0), grad_bthd.stride(1), grad_bthd.stride(2), stride_segb, h, t,
                DK=dk, DV=dv, BLOCK=block_size, BLOCK_D=block, WANT_DK=want_dk,
                HAS_DOC=has_doc, HAS_DSTATE=has_dstate, DOT_PRECISION=precision,
                num_warps=num_warps)
    return dq_bthd, dk_bthd, dv_bthd
