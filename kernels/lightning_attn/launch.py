"""Host launchers for the lightning-attention kernels: check, allocate, grid, launch.

Legend: B batch, T sequence length, H heads, Dk / Dv key and value dims. Suffixes name
layouts: `q_bthd` [B, T, H, Dk], `state_bhkv` [B, H, Dk, Dv], `seg_bt` [B, T]. No autograd
here (see function.py). Triton is imported inside the functions, so this module imports on
machines without it.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_BLOCK = 64
# Column slices of the state one program holds: at most 64 x 128 float32 in registers.
_MAX_BLOCK_DV = 64
_MAX_BLOCK_DK = 64

# Set by tests: outputs start as NaN instead of uninitialised memory, so an element a
# kernel forgot to write shows up.
DEBUG_FILL_NAN = False


def _empty(shape: tuple[int, ...], *, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if DEBUG_FILL_NAN:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _head_dim_last(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/time/head strides but need the head dim contiguous."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs are used for checking: keep them exact rather than TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _device_ctx(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, not the current one (interpreter runs take CPU tensors)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _pow2_at_least_16(name: str, value: int) -> None:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name}={value} must be a power of two >= 16")


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
    _pow2_at_least_16("block_size", block_size)


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
    block_dv = block_dv or min(dv, _MAX_BLOCK_DV)
    _pow2_at_least_16("block_dv", block_dv)
    if block_dv > dv:
        raise ValueError(f"block_dv={block_dv} must be <= Dv={dv}")
    from longtrain_kernels.lightning_attn import kernel

    q, k, v = _head_dim_last(q), _head_dim_last(k), _head_dim_last(v)
    o_bthd = _empty((b, t, h, dv), like=q, dtype=q.dtype)
    state_bhkv = _empty((b, h, dk, dv), like=q, dtype=torch.float32)
    if t == 0:
        return o_bthd, state_bhkv.zero_()
    if b * h == 0:
        return o_bthd, state_bhkv
    seg, stride_segb = _seg_arg(seg, q)
    log_decay = log_decay.contiguous()
    with _device_ctx(q):
        kernel.lightning_fwd_kernel[(b * h, dv // block_dv)](
            q, k, v, o_bthd, state_bhkv, log_decay, seg,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o_bthd.stride(0), o_bthd.stride(1), o_bthd.stride(2), stride_segb, h, t,
            DK=dk, DV=dv, BLOCK=block_size, BLOCK_DV=block_dv, HAS_DOC=seg.dim() == 2,
            DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps)
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
    block_dk = block_dk or min(dk, _MAX_BLOCK_DK)
    _pow2_at_least_16("block_dk", block_dk)
    if block_dk > dk:
        raise ValueError(f"block_dk={block_dk} must be <= Dk={dk}")
    block_dv = block_dv or min(dv, _MAX_BLOCK_DV)
    _pow2_at_least_16("block_dv", block_dv)
    if block_dv > dv:
        raise ValueError(f"block_dv={block_dv} must be <= Dv={dv}")
    if do.shape != v.shape:
        raise ValueError(f"do {tuple(do.shape)} must match v {tuple(v.shape)}")
    if dstate is not None and dstate.shape != (b, h, dk, dv):
        raise ValueError(f"dstate {tuple(dstate.shape)} must be [B, H, Dk, Dv] = "
                         f"{(b, h, dk, dv)}")
    from longtrain_kernels.lightning_attn import kernel

    q, k, v = _head_dim_last(q), _head_dim_last(k), _head_dim_last(v)
    do = _head_dim_last(do.to(q.dtype))
    dq_bthd = _empty((b, t, h, dk), like=q, dtype=q.dtype)
    dk_bthd = _empty((b, t, h, dk), like=k, dtype=k.dtype)
    dv_bthd = _empty((b, t, h, dv), like=v, dtype=v.dtype)
    if t == 0 or b * h == 0:
        return dq_bthd, dk_bthd, dv_bthd
    seg, stride_segb = _seg_arg(seg, q)
    has_doc = seg.dim() == 2
    has_dstate = dstate is not None
    dstate_bhkv = dstate.float().contiguous() if has_dstate else seg
    log_decay = log_decay.contiguous()
    precision = _dot_precision(q.dtype)
    with _device_ctx(q):
        kernel.lightning_bwd_dq_kernel[(b * h, dk // block_dk)](
            k, v, do, dq_bthd, log_decay, seg,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dq_bthd.stride(0), dq_bthd.stride(1), dq_bthd.stride(2), stride_segb, h, t,
            DV=dv, BLOCK=block_size, BLOCK_DK=block_dk, HAS_DOC=has_doc,
            DOT_PRECISION=precision, num_warps=num_warps)
        kernel.lightning_bwd_dk_kernel[(b * h, dk // block_dk)](
            q, v, do, dstate_bhkv, dk_bthd, log_decay, seg,
            q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dk_bthd.stride(0), dk_bthd.stride(1), dk_bthd.stride(2), stride_segb, h, t,
            DK=dk, DV=dv, BLOCK=block_size, BLOCK_DK=block_dk, HAS_DOC=has_doc,
            HAS_DSTATE=has_dstate, DOT_PRECISION=precision, num_warps=num_warps)
        kernel.lightning_bwd_dv_kernel[(b * h, dv // block_dv)](
            q, k, do, dstate_bhkv, dv_bthd, log_decay, seg,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dv_bthd.stride(0), dv_bthd.stride(1), dv_bthd.stride(2), stride_segb, h, t,
            DK=dk, DV=dv, BLOCK=block_size, BLOCK_DV=block_dv, HAS_DOC=has_doc,
            HAS_DSTATE=has_dstate, DOT_PRECISION=precision, num_warps=num_warps)
    return dq_bthd, dk_bthd, dv_bthd
