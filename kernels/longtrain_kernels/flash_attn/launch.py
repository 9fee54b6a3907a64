"""Host launchers for the block flash-attention kernels: check, allocate, grid, launch.

Legend: B batch, Tq query rows and Tk key columns of the block, Hq query heads, Hkv key/value
heads, D head dim. Suffixes name layouts: `q_bthd` [B, Tq, Hq, D], `lse_bht` [B, Hq, Tq].
No autograd here (see function.py). Triton is imported inside the functions, so this module
imports on machines without it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from longtrain_kernels._launch_common import (check_pow2_at_least_16, device_ctx, doc_args,
                                              dot_precision, empty, head_dim_last)

_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Tiles measured on an H100 (bf16, causal, T 8K-32K, D 64 and 128; see README.md).
_FWD_TILES = dict(block_m=128, block_n=64, num_stages=3)
_BWD_TILES = dict(block_m=128, block_n=64, dkdv_block_m=64, dkdv_block_n=128, num_stages=3)


def _warps(block_a: int, block_b: int) -> int:
    # On the 128 x 64 tiles 4 warps measured 1.5x (forward) to 4x (backward) slower than 8.
    return 8 if block_a * block_b >= 128 * 64 else 4


def _check(q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor,
           q_doc: Optional[torch.Tensor], k_doc: Optional[torch.Tensor], *,
           block_m: int, block_n: int) -> None:
    if q_bthd.dim() != 4 or k_bthd.dim() != 4 or v_bthd.shape != k_bthd.shape:
        raise ValueError(f"expected q [B, Tq, Hq, D] and k, v [B, Tk, Hkv, D]; got q "
                         f"{tuple(q_bthd.shape)}, k {tuple(k_bthd.shape)}, "
                         f"v {tuple(v_bthd.shape)}")
    b, _, hq, d = q_bthd.shape
    bk, tk, hkv, dk = k_bthd.shape
    if bk != b or dk != d:
        raise ValueError(f"q {tuple(q_bthd.shape)} and k {tuple(k_bthd.shape)} disagree on "
                         "batch or head dim")
    if hq % hkv != 0:
        raise ValueError(f"query heads Hq={hq} must be a multiple of key/value heads Hkv={hkv}")
    if d not in _HEAD_DIMS:
        raise ValueError(f"head dim D={d} not supported; use one of {_HEAD_DIMS}")
    if not (q_bthd.dtype == k_bthd.dtype == v_bthd.dtype) or q_bthd.dtype not in _DTYPES:
        raise ValueError(f"q, k, v dtypes must match and be one of {_DTYPES}; got "
                         f"{q_bthd.dtype}, {k_bthd.dtype}, {v_bthd.dtype}")
    check_pow2_at_least_16("block_m", block_m)
    check_pow2_at_least_16("block_n", block_n)
    if (q_doc is None) != (k_doc is None):
        raise ValueError("q_doc and k_doc must be given together")
    if q_doc is not None:
        if q_doc.shape != q_bthd.shape[:2] or k_doc.shape != (b, tk):
            raise ValueError(f"q_doc {tuple(q_doc.shape)} / k_doc {tuple(k_doc.shape)} must be "
                             f"[B, Tq] = {tuple(q_bthd.shape[:2])} / [B, Tk] = {(b, tk)}")
        if q_doc.dtype not in (torch.int32, torch.int64) or k_doc.dtype != q_doc.dtype:
            raise ValueError(f"q_doc / k_doc must both be int32 or int64; got {q_doc.dtype}, "
                             f"{k_doc.dtype}")


def flash_block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                        causal: bool = False, q_offset: int = 0, k_offset: int = 0,
                        q_doc: Optional[torch.Tensor] = None,
                        k_doc: Optional[torch.Tensor] = None, block_m: Optional[int] = None,
                        block_n: Optional[int] = None, num_warps: Optional[int] = None,
                        num_stages: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Tq, Hq, D] in q's dtype, lse [B, Hq, Tq] float32) of one attention block.

    q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D] (fp16/bf16/fp32, head dim contiguous). Query row i
    is at global position q_offset + i, key column j at k_offset + j; `causal` allows key
    position <= query position; q_doc [B, Tq] / k_doc [B, Tk] (int32/int64) allow only equal
    ids. Rows with no allowed key get out 0 and lse -inf. Tile options left None take the
    measured defaults.
    """
    from longtrain_kernels.flash_attn import kernel

    block_m = block_m or _FWD_TILES["block_m"]
    block_n = block_n or _FWD_TILES["block_n"]
    num_stages = num_stages or _FWD_TILES["num_stages"]
    _check(q, k, v, q_doc, k_doc, block_m=block_m, block_n=block_n)
    q, k, v = head_dim_last(q), head_dim_last(k), head_dim_last(v)
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    out_bthd = empty((b, tq, hq, d), like=q, dtype=q.dtype)
    lse_bht = empty((b, hq, tq), like=q, dtype=torch.float32)
    if out_bthd.numel() == 0:
        return out_bthd, lse_bht
    q_doc, k_doc, stride_qdb, stride_kdb, has_doc = doc_args(q_doc, k_doc, like=q)
    grid = (math.ceil(tq / block_m), b * hq)
    with device_ctx(q):
        kernel.flash_fwd_kernel[grid](
            q, k, v, out_bthd, lse_bht, q_doc, k_doc,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out_bthd.stride(0), out_bthd.stride(1), out_bthd.stride(2),
            stride_qdb, stride_kdb, hq, tq, tk, q_offset, k_offset, scale * math.log2(math.e),
            GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
            HAS_DOC=has_doc,
            DOT_PRECISION=dot_precision(q.dtype),
            num_warps=num_warps or _warps(block_m, block_n),
            num_stages=num_stages)
    return out_bthd, lse_bht


def flash_block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, *, scale: float,
                         causal: bool = False,
                         q_offset: int = 0, k_offset: int = 0,
                         q_doc: Optional[torch.Tensor] = None,
                         k_doc: Optional[torch.Tensor] = None, block_m: Optional[int] = None,
                         block_n: Optional[int] = None, dkdv_block_m: Optional[int] = None,
                         dkdv_block_n: Optional[int] = None, num_warps: Optional[int] = None,
                         num_stages: Optional[int] = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq [B, Tq, Hq, D], dk [B, Tk, Hkv, D], dv [B, Tk, Hkv, D]) of one block, input dtype.

    dout/out [B, Tq, Hq, D] (any float dtype; dout is cast to q's), lse [B, Hq, Tq]. out and
    lse may be the merged (global) output and lse of the query rows over all blocks, so
    per-block gradients sum to the full gradient (ring attention). Rows with lse -inf contribute nothing. The dq kernel holds
    block_m query rows and loops over key tiles of block_n; the dk/dv kernel holds
    dkdv_block_n keys and loops over query tiles of dkdv_block_m. No atomics. When block_m /
    block_n are given, the dk/dv tiles default to them; options left None take the measured
    defaults.
    """
    from longtrain_kernels.flash_attn import kernel

    if block_m is None and block_n is None:
        block_m, block_n = _BWD_TILES["block_m"], _BWD_TILES["block_n"]
        dkdv_block_m = dkdv_block_m or _BWD_TILES["dkdv_block_m"]
        dkdv_block_n = dkdv_block_n or _BWD_TILES["dkdv_block_n"]
    block_m = block_m or _BWD_TILES["block_m"]
    block_n = block_n or _BWD_TILES["block_n"]
    dkdv_block_m, dkdv_block_n = dkdv_block_m or block_m, dkdv_block_n or block_n
    num_stages = num_stages or _BWD_TILES["num_stages"]
    _check(q, k, v, q_doc, k_doc, block_m=block_m, block_n=block_n)
    _check(q, k, v, q_doc, k_doc, block_m=dkdv_block_m, block_n=dkdv_block_n)
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must match q "
                         f"{tuple(q.shape)}")
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if lse.shape != (b, hq, tq):
        raise ValueError(f"lse {tuple(lse.shape)} must be [B, Hq, Tq] = {(b, hq, tq)}")
    q, k, v = head_dim_last(q), head_dim_last(k), head_dim_last(v)
    # dO feeds tensor-core dots with V and K; out (any float dtype, e.g. an fp32 merged
    # output) is only read by the preprocess.
    dout, out = head_dim_last(dout.to(q.dtype)), head_dim_last(out)
    lse = lse.float().contiguous()
    dq_bthd = empty((b, tq, hq, d), like=q, dtype=q.dtype)
    dk_bthd = empty((b, tk, hkv, d), like=k, dtype=k.dtype)
    dv_bthd = empty((b, tk, hkv, d), like=v, dtype=v.dtype)
    if tq == 0 or tk == 0 or b * hq == 0:
        return dq_bthd.zero_(), dk_bthd.zero_(), dv_bthd.zero_()
    delta_bht = torch.empty((b, hq, tq), dtype=torch.float32, device=q.device)
    lse2_bht = torch.empty((b, hq, tq), dtype=torch.float32, device=q.device)
    q_doc, k_doc, stride_qdb, stride_kdb, has_doc = doc_args(q_doc, k_doc, like=q)
    precision = dot_precision(q.dtype)
    qk_scale = scale * math.log2(math.e)
    with device_ctx(q):
        kernel.flash_bwd_preprocess_kernel[(math.ceil(tq / 64), b * hq)](
            out, dout, lse, delta_bht, lse2_bht,
            out.stride(0), out.stride(1), out.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2), hq, tq, HEAD_DIM=d, BLOCK_M=64)
        kernel.flash_bwd_dq_kernel[(math.ceil(tq / block_m), b * hq)](
            q, k, v, dout, dq_bthd, lse2_bht, delta_bht, q_doc, k_doc,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1),
            dout.stride(2), dq_bthd.stride(0), dq_bthd.stride(1), dq_bthd.stride(2),
            stride_qdb, stride_kdb, hq, tq, tk, q_offset, k_offset, scale, qk_scale,
            GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
            HAS_DOC=has_doc, DOT_PRECISION=precision,
            num_warps=num_warps or _warps(block_m, block_n), num_stages=num_stages)
        kernel.flash_bwd_dkdv_kernel[(math.ceil(tk / dkdv_block_n), b * hkv)](
            q, k, v, dout, dk_bthd, dv_bthd, lse2_bht, delta_bht, q_doc, k_doc,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1),
            dout.stride(2), dk_bthd.stride(0), dk_bthd.stride(1), dk_bthd.stride(2),
            dv_bthd.stride(0), dv_bthd.stride(1), dv_bthd.stride(2), stride_qdb, stride_kdb,
            hkv, tq, tk, q_offset, k_offset, scale, qk_scale,
            GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=dkdv_block_m, BLOCK_N=dkdv_block_n,
            CAUSAL=causal, HAS_DOC=has_doc, EVEN_M=tq % dkdv_block_m == 0,
            DOT_PRECISION=precision,
            num_warps=num_warps or _warps(dkdv_block_m, dkdv_block_n), num_stages=num_stages)
    return dq_bthd, dk_bthd, dv_bthd
