"""Parity canary: recompute one attention call densely on the whole sequence and fail loudly
when the context-parallel result differs (a silent backward/layout bug shows up here first).

Legend: B batch, T local length, H heads, D head dim. Costs one all-gather of q/k/v/out of
the first sequence of the micro-batch over the CP group and one dense attention; run it
every `attention.check_every` steps, not every step.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from longtrain.attention.dense import dense_attention
from longtrain.attention.types import AttentionContext, AttentionFn, AttentionMeta
from longtrain.parallel.layout import unsplit_from_cp


class ParityError(RuntimeError):
    """The context-parallel attention disagrees with dense attention."""


def default_tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


def _gather_sequence(x_bt: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    if ctx.cp_size == 1:
        return x_bt
    parts = [torch.empty_like(x_bt) for _ in range(ctx.cp_size)]
    dist.all_gather(parts, x_bt.contiguous(), group=ctx.cp_group)
    return unsplit_from_cp(parts, dim=1)


@torch.no_grad()
def parity_error(q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor,
                 out_bthd: torch.Tensor, meta: AttentionMeta, ctx: AttentionContext) -> float:
    """max|out - dense| / max|dense| over the first sequence of the batch (all CP ranks call)."""
    first = lambda x: None if x is None else x[:1]  # noqa: E731
    full = [_gather_sequence(first(x), ctx) for x in (q_bthd, k_bthd, v_bthd, out_bthd)]
    doc = meta.doc_ids_bt
    full_doc = None if doc is None else _gather_sequence(first(doc), ctx)
    ref = dense_attention(*full[:3], AttentionMeta(causal=meta.causal, doc_ids_bt=full_doc,
                                                   softmax_scale=meta.softmax_scale),
                          AttentionContext())
    err = (full[3].double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12)
    return float(err)


def check_parity(q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor,
                 out_bthd: torch.Tensor, meta: AttentionMeta, ctx: AttentionContext, *,
                 backend: str, tol: Optional[float], where: str) -> float:
    """Raise ParityError when the error exceeds `tol` (None: by dtype); returns the error."""
    tol = default_tolerance(q_bthd.dtype) if tol is None else tol
    err = parity_error(q_bthd, k_bthd, v_bthd, out_bthd, meta, ctx)
    if not err <= tol:
        raise ParityError(f"attention parity check failed at {where}: attention.backend="
                          f"{backend!r} differs from dense attention by {err:.3e} (relative), "
                          f"above attention.check_tol={tol:.1e} (cp={ctx.cp_size})")
    return err


class ParityCanary:
    """Wraps one softmax layer's attention function from outside the model (`install`): armed
    for one call (`arm`), it checks that call's output against dense attention
    (`check_parity`) and keeps the error (`last_error`); otherwise it only forwards."""

    def __init__(self, fn: AttentionFn, *, where: str) -> None:
        self.fn = fn
        self.where = where
        self.backend = getattr(fn, "__name__", str(fn))
        self.armed = False
        self.tol: Optional[float] = None
        self.last_error: Optional[float] = None

    def arm(self, *, tol: Optional[float]) -> None:
        self.armed, self.tol, self.last_error = True, tol, None

    def __call__(self, q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor,
                 meta: AttentionMeta, ctx: AttentionContext) -> torch.Tensor:
        out = self.fn(q_bthd, k_bthd, v_bthd, meta, ctx)
        if self.armed:
            # disarmed first: a recomputed forward (memory.checkpointing) does not check again
            self.armed = False
            self.last_error = check_parity(q_bthd, k_bthd, v_bthd, out.detach(), meta, ctx,
                                           tol=self.tol, backend=self.backend,
                                           where=self.where)
        return out


def install(model: Any) -> Optional[ParityCanary]:
    """Put a ParityCanary around the first softmax attention layer of `model` (a LlamaModel);
    None when the model has no softmax layer (nothing to check)."""
    layer = next((layer for layer in model.layers if layer.kind == "softmax"), None)
    if layer is None:
        return None
    canary = ParityCanary(layer.attn.attention, where="the first softmax layer")
    layer.attn.attention = canary
    return canary
