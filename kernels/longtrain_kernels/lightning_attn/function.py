"""Autograd wrapper, argument checks and backend dispatch for lightning attention.

Legend: B batch, T sequence length, H heads, Dk key/query dim, Dv value dim. Two backends
share one autograd.Function: "torch" (blocked.py, any device and dtype incl. float64) and
"triton" (launch.py, fp16/bf16/fp32 with Dk, Dv in {16, 32, 64, 128}).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from longtrain_kernels._function_common import (DOC_DTYPES, FLOAT_DTYPES, Backend,
                                                available, resolve_kernels)
from longtrain_kernels.lightning_attn import blocked, launch

_BACKENDS: dict[str, Backend] = {
    "torch": Backend(blocked.blocked_forward, blocked.blocked_backward),
    "triton": Backend(launch.lightning_forward, launch.lightning_backward),
}


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
           doc_ids: Optional[torch.Tensor], block_size: Optional[int]) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 4-d tensor [B, T, H, D]; got {got}")
    if k.shape != q.shape:
        raise ValueError(f"k {tuple(k.shape)} must have q's shape {tuple(q.shape)} "
                         "[B, T, H, Dk]")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} must be [B, T, H, Dv] with q's B, T, H "
                         f"{tuple(q.shape[:3])}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q, k, v dtypes must match and be one of {FLOAT_DTYPES}; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    h = q.shape[2]
    if (not isinstance(log_decay, torch.Tensor) or log_decay.shape != (h, )
            or log_decay.dtype not in (torch.float32, torch.float64)):
        got = ((tuple(log_decay.shape), log_decay.dtype) if isinstance(log_decay, torch.Tensor)
               else type(log_decay).__name__)
        raise ValueError(f"log_decay must be a float32 tensor [H] = [{h}]; got {got}")
    # Only checked where it costs no device sync.
    if log_decay.device.type == "cpu" and bool((log_decay > 0).any()):
        raise ValueError(f"log_decay must be <= 0 (decay exp(log_decay) <= 1); got "
                         f"{log_decay.tolist()}")
    if doc_ids is not None:
        if doc_ids.shape != q.shape[:2] or doc_ids.dtype not in DOC_DTYPES:
            raise ValueError(f"doc_ids must be int64/int32 [B, T] = {tuple(q.shape[:2])}; "
                             f"got {tuple(doc_ids.shape)} {doc_ids.dtype}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size={block_size} must be positive")


def segments(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] int32: each contiguous run of equal doc ids numbered 0, 1, ... left to right.

    The recurrence resets wherever the id changes, so a repeated id after another document is
    a new document; with run numbers, "same document" is plain equality in the blocked code.
    """
    change_bt = torch.ones_like(doc_ids, dtype=torch.int32)
    change_bt[:, 0] = 0
    change_bt[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]).to(torch.int32)
    return change_bt.cumsum(1, dtype=torch.int32)


class LightningAttentionFunction(torch.autograd.Function):
    """Saves the inputs only; the backward recomputes the states block by block."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                log_decay: torch.Tensor, seg: Optional[torch.Tensor], block_size: Optional[int],
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        o, state = _BACKENDS[backend].forward(q, k, v, log_decay, seg, block_size=block_size)
        ctx.save_for_backward(q, k, v, log_decay, seg)
        ctx.block_size, ctx.backend = block_size, backend
        return o, state

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor,
                 dstate: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        q, k, v, log_decay, seg = ctx.saved_tensors
        dq, dk, dv = _BACKENDS[ctx.backend].backward(do, dstate, q, k, v, log_decay, seg,
                                                     block_size=ctx.block_size)
        return dq, dk, dv, None, None, None, None


def _apply(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
           doc_ids: Optional[torch.Tensor], block_size: Optional[int],
           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    seg = None if doc_ids is None else segments(doc_ids.to(q.device))
    if backend == "triton":
        # Kernel state is float32 whatever the input dtype.
        log_decay = log_decay.to(device=q.device, dtype=torch.float32)
    return LightningAttentionFunction.apply(q, k, v, log_decay.detach(), seg, block_size,
                                            backend)


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        log_decay: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, *,
                        block_size: Optional[int] = None,
                        backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention with per-head decay: (o [B, T, H, Dv], state [B, H, Dk, Dv]).

        o[t] = sum_{s <= t, doc[s] == doc[t]} exp(log_decay[h] * (t - s)) (q[t] . k[s]) v[s]

    q, k [B, T, H, Dk], v [B, T, H, Dv] (one float dtype); log_decay [H] float32, values
    <= 0, not differentiated; doc_ids [B, T] int64/int32 or None (the state resets wherever
    the id changes). No softmax or scaling. o is in the input dtype; state, the recurrent KV
    state after the last token (its document only), is float32 (float64 for float64 inputs).
    Differentiable in q, k, v through both outputs.

    backend: "auto" takes the Triton kernels for CUDA tensors they support (fp16/bf16/fp32,
    Dk, Dv in {16, 32, 64, 128}) and the blocked PyTorch path otherwise; "triton" forces the
    kernels (on CPU that needs Triton's interpreter, TRITON_INTERPRET=1); "torch" forces the
    PyTorch path.
    block_size: the sequence block (default 64; a power of two >= 16 for Triton).
    """
    _check(q, k, v, log_decay, doc_ids, block_size)
    supported = backend == "auto" and q.is_cuda and launch.supports(q, k, v)
    return _apply(q, k, v, log_decay, doc_ids, block_size,
                  resolve_kernels(backend, q, supported=supported))


def lightning_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              log_decay: torch.Tensor, doc_ids: Optional[torch.Tensor] = None,
                              *, block_size: Optional[int] = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """`lightning_attention` on the blocked PyTorch path (any device, float64 included):
    O(T * block_size) memory, explicit blocked backward."""
    return lightning_attention(q, k, v, log_decay, doc_ids, block_size=block_size,
                               backend="torch")
