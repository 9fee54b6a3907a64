"""Argument checks, backend dispatch and the autograd wrapper of S2-Attention.

Legend: B batch, Tq query rows, Tk keys, Hq query heads, Hkv key/value heads, D head dim.
Two backends share one autograd.Function: "torch" (blocked.py: any device, float dtypes incl.
float64) and "triton" (launch.py: fp16/bf16/fp32, D in {16, 32, 64, 128}). Both take and give
[B, H, T, D] views of the caller's [B, T, H, D] tensors.

With `k_blocks` (the global key block each block of k / v holds: what a context-parallel rank
received) the torch backend reads k / v through a block lookup; the Triton kernels address
keys by global position, so for them k / v are scattered into a zero-filled prefix for the
length of one call (forward, or backward) and the key gradients gathered back. Either way the
autograd graph keeps only the compact k / v.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from longtrain_kernels._function_common import (DOC_DTYPES, FLOAT_DTYPES, Backend,
                                                available, resolve_kernels)
from longtrain_kernels.s2_attn import blocked, launch
from longtrain_kernels.s2_attn.pattern import S2Pattern


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: S2Pattern, *,
           head_offset: int, q_start: int, q_doc: Optional[torch.Tensor],
           k_doc: Optional[torch.Tensor], k_blocks: Optional[tuple[int, ...]]) -> None:
    if not isinstance(pattern, S2Pattern):
        raise ValueError(f"pattern must be an S2Pattern; got {type(pattern).__name__}")
    problems = pattern.problems()
    if problems:
        raise ValueError("pattern: " + "; ".join(problems))
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 4-d tensor [B, T, H, D]; got {got}")
    b, tq, hq, d = q.shape
    if v.shape != k.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
                         f"[B, Tk, Hkv, D] with q's B={b}, D={d}")
    tk, hkv = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads Hq={hq} must be a multiple of key/value heads Hkv={hkv}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q, k, v dtypes must match and be one of {FLOAT_DTYPES}; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not 0 <= head_offset <= pattern.num_heads - hq:
        raise ValueError(f"head_offset={head_offset} with Hq={hq} local heads must lie within "
                         f"pattern.num_heads={pattern.num_heads}")
    bs = pattern.block_size
    for name, value in (("q_start", q_start), ("Tq", tq), ("Tk", tk)):
        if value < 0 or value % bs != 0:
            raise ValueError(f"{name}={value} must be a non-negative multiple of "
                             f"pattern.block_size={bs}")
    if k_blocks is None:
        if tk < q_start + tq:
            raise ValueError(f"Tk={tk} must cover the queries: Tk >= q_start + Tq = "
                             f"{q_start + tq}")
    else:
        _check_blocks(k_blocks, tk=tk, q_start=q_start, tq=tq, bs=bs)
    if (q_doc is None) != (k_doc is None):
        raise ValueError("q_doc and k_doc must be given together")
    if q_doc is not None:
        if tuple(q_doc.shape) != (b, tq) or tuple(k_doc.shape) != (b, tk):
            raise ValueError(f"q_doc {tuple(q_doc.shape)} / k_doc {tuple(k_doc.shape)} must be "
                             f"[B, Tq] = {(b, tq)} / [B, Tk] = {(b, tk)}")
        if q_doc.dtype not in DOC_DTYPES or k_doc.dtype != q_doc.dtype:
            raise ValueError(f"q_doc / k_doc must both be int32 or int64; got {q_doc.dtype}, "
                             f"{k_doc.dtype}")


def _check_blocks(k_blocks: tuple[int, ...], *, tk: int, q_start: int, tq: int, bs: int
                  ) -> None:
    if len(k_blocks) * bs != tk:
        raise ValueError(f"k_blocks names {len(k_blocks)} blocks of {bs}, but k holds Tk={tk} "
                         f"keys")
    if any(b < 0 for b in k_blocks) or any(a >= b for a, b in zip(k_blocks, k_blocks[1:])):
        raise ValueError(f"k_blocks must be distinct non-negative block indices in ascending "
                         f"order; got {k_blocks[:8]}{'...' if len(k_blocks) > 8 else ''}")
    missing = sorted(set(range(q_start // bs, (q_start + tq) // bs)) - set(k_blocks))
    if missing:
        raise ValueError(f"k_blocks must hold the queries' own (diagonal) blocks; missing "
                         f"{missing[:8]}")


def _expanded(x_bhtd: torch.Tensor, k_blocks: tuple[int, ...], bs: int) -> torch.Tensor:
    """Compact [B, H, n*bs, ...] -> [B, H, (last + 1)*bs, ...] in global key order, zeros where
    no block is held (never read)."""
    b, h, _, *rest = x_bhtd.shape
    full = x_bhtd.new_zeros((b, h, (k_blocks[-1] + 1) * bs, *rest))
    full.view(b, h, -1, bs, *rest)[:, :, list(k_blocks)] = x_bhtd.reshape(b, h, -1, bs, *rest)
    return full


def _compacted(x_bhtd: torch.Tensor, k_blocks: tuple[int, ...], bs: int) -> torch.Tensor:
    b, h, _, *rest = x_bhtd.shape
    return x_bhtd.reshape(b, h, -1, bs, *rest)[:, :, list(k_blocks)].reshape(b, h, -1, *rest)


def _expanded_keys(k: torch.Tensor, v: torch.Tensor, k_doc: Optional[torch.Tensor],
                   k_blocks: tuple[int, ...], bs: int) -> tuple[torch.Tensor, ...]:
    """Compact k, v, k_doc -> the global-order prefix the Triton kernels address."""
    k_doc = None if k_doc is None else _expanded(k_doc[:, None], k_blocks, bs)[:, 0]
    return _expanded(k, k_blocks, bs), _expanded(v, k_blocks, bs), k_doc


def _triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: S2Pattern, *,
                    k_blocks: Optional[tuple[int, ...]], k_doc: Optional[torch.Tensor],
                    **opts: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if k_blocks is not None:
        k, v, k_doc = _expanded_keys(k, v, k_doc, k_blocks, pattern.block_size)
    return launch.s2_forward(q, k, v, pattern, k_doc=k_doc, **opts)


def _triton_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     out: torch.Tensor, lse: torch.Tensor, pattern: S2Pattern, *,
                     k_blocks: Optional[tuple[int, ...]], k_doc: Optional[torch.Tensor],
                     **opts: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if k_blocks is None:
        return launch.s2_backward(dout, q, k, v, out, lse, pattern, k_doc=k_doc, **opts)
    bs = pattern.block_size
    k, v, k_doc = _expanded_keys(k, v, k_doc, k_blocks, bs)
    dq, dk, dv = launch.s2_backward(dout, q, k, v, out, lse, pattern, k_doc=k_doc, **opts)
    return dq, _compacted(dk, k_blocks, bs), _compacted(dv, k_blocks, bs)


_BACKENDS: dict[str, Backend] = {
    "torch": Backend(blocked.blocked_forward, blocked.blocked_backward),
    "triton": Backend(_triton_forward, _triton_backward),
}


def _resolve(backend: str, q: torch.Tensor) -> str:
    supported = backend == "auto" and q.is_cuda and launch.triton_supports(q)
    name = resolve_kernels(backend, q, supported=supported)
    if backend == "triton":
        launch.check_triton_args(q)
    return name


class S2AttentionFunction(torch.autograd.Function):
    """Forward keeps (q, k, v, out, lse); backward recomputes probabilities block by block."""

    @staticmethod
    def forward(ctx: Any, q_bhtd: torch.Tensor, k_bhtd: torch.Tensor, v_bhtd: torch.Tensor,
                pattern: S2Pattern, opts: dict[str, Any], backend: str) -> torch.Tensor:
        out, lse = _BACKENDS[backend].forward(q_bhtd, k_bhtd, v_bhtd, pattern, **opts)
        ctx.save_for_backward(q_bhtd, k_bhtd, v_bhtd, out, lse)
        ctx.pattern, ctx.opts, ctx.backend = pattern, opts, backend
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _BACKENDS[ctx.backend].backward(dout, q, k, v, out, lse, ctx.pattern,
                                                     **ctx.opts)
        return dq, dk, dv, None, None, None


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: S2Pattern, *,
             head_offset: int, q_start: int, scale: Optional[float],
             q_doc: Optional[torch.Tensor], k_doc: Optional[torch.Tensor],
             k_blocks: Optional[tuple[int, ...]], backend: str) -> tuple[dict[str, Any], str]:
    k_blocks = None if k_blocks is None else tuple(int(b) for b in k_blocks)
    _check(q, k, v, pattern, head_offset=head_offset, q_start=q_start, q_doc=q_doc,
           k_doc=k_doc, k_blocks=k_blocks)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    opts = dict(head_offset=head_offset, q_start=q_start, scale=scale, q_doc=q_doc,
                k_doc=k_doc, k_blocks=k_blocks)
    return opts, _resolve(backend, q)


def s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: S2Pattern, *,
                 head_offset: int = 0, q_start: int = 0, scale: Optional[float] = None,
                 q_doc: Optional[torch.Tensor] = None, k_doc: Optional[torch.Tensor] = None,
                 k_blocks: Optional[tuple[int, ...]] = None, backend: str = "auto"
                 ) -> torch.Tensor:
    """S2-Attention: per-head block-sparse causal softmax attention. Differentiable in q, k, v.

    q [B, Tq, Hq, D] are the rows at global positions q_start .. q_start + Tq - 1; k, v
    [B, Tk, Hkv, D] the keys at positions 0 .. Tk - 1 (Tk >= q_start + Tq; q_start, Tq, Tk
    multiples of pattern.block_size). Local query head h reads kv head h // (Hq // Hkv) and is
    global head head_offset + h of `pattern` (tensor parallelism slices heads). Query p sees
    key s iff s <= p, q_doc[p] == k_doc[s] (q_doc [B, Tq], k_doc [B, Tk] int32/int64, both or
    neither) and pattern.block_allowed(p // bs, s // bs, head_offset + h). `scale` defaults to
    1/sqrt(D). With `k_blocks` (ascending global block indices, holding at least the queries'
    own blocks and every block they may read) k / v / k_doc hold only those blocks, in that
    order: Tk = len(k_blocks) * bs. backend: "auto" (Triton on CUDA when available, else
    torch), "torch", "triton".
    Returns out [B, Tq, Hq, D] in q's dtype.
    """
    opts, name = _prepare(q, k, v, pattern, head_offset=head_offset, q_start=q_start,
                          scale=scale, q_doc=q_doc, k_doc=k_doc, k_blocks=k_blocks,
                          backend=backend)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    return t(S2AttentionFunction.apply(t(q), t(k), t(v), pattern, opts, name))


def s2_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: S2Pattern, *,
                     head_offset: int = 0, q_start: int = 0, scale: Optional[float] = None,
                     q_doc: Optional[torch.Tensor] = None, k_doc: Optional[torch.Tensor] = None,
                     k_blocks: Optional[tuple[int, ...]] = None, backend: str = "auto"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Tq, Hq, D] in q's dtype, lse [B, Hq, Tq]) of `s2_attention`, not differentiable.

    lse is the natural-log log-sum-exp of the row's allowed scores: float32, or float64 for
    float64 inputs.
    """
    opts, name = _prepare(q, k, v, pattern, head_offset=head_offset, q_start=q_start,
                          scale=scale, q_doc=q_doc, k_doc=k_doc, k_blocks=k_blocks,
                          backend=backend)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    with torch.no_grad():
        out, lse = _BACKENDS[name].forward(t(q), t(k), t(v), pattern, **opts)
    return t(out), lse
