"""Parity canary: recompute one attention call exactly on a sample of query blocks and fail
loudly when the context-parallel result differs (a silent backward/layout bug shows up here
first).

Legend: B batch, T local length, H query heads, D head dim, S sampled rows per rank, C the
key chunk. Only the first sequence of the micro-batch is checked.
- Each rank samples two blocks of `rows` query rows of its shard: its last block (in the
  zigzag layout the last rank's reads every key of the sequence) and one at random.
- The ranks all-gather the sampled queries (S x CP rows, with global positions and document
  ids). Each rank computes, in float64, the softmax partials (row max, sum, weighted values)
  of every sampled row against its own keys, chunk by chunk (`SCORE_ELEMENTS` bounds one
  chunk's scores).
- The partials merge over the CP group like a ring's (log-sum-exp), and each rank compares
  its rows' output with the merged reference.
Besides the shard its memory is constant: the canary never holds the whole sequence, so it
runs at any length. Run it every `attention.check_every` steps.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from longtrain.attention.types import AttentionContext, AttentionFn, AttentionMeta
from longtrain.parallel.layout import zigzag_positions

# query rows per sampled block; elements of one chunk's float64 scores [H, S x CP, C] (the
# key chunk C follows from it)
ROWS = 64
SCORE_ELEMENTS = 1 << 22


class ParityError(RuntimeError):
    """The context-parallel attention disagrees with dense attention."""


def default_tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


def sample_rows(t: int, *, rows: int, generator: torch.Generator) -> torch.Tensor:
    """Local rows to check: the shard's last block of `rows` and one block at random
    (overlapping when the shard is short), ascending, distinct."""
    rows = min(rows, t)
    start = int(torch.randint(0, t - rows + 1, (1,), generator=generator))
    picked = torch.cat([torch.arange(start, start + rows), torch.arange(t - rows, t)])
    return torch.unique(picked)


def _all_gather(x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """Concatenation over the CP ranks along dim 0 (every rank's x has the same shape)."""
    if ctx.cp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(ctx.cp_size)]
    dist.all_gather(parts, x.contiguous(), group=ctx.cp_group)
    return torch.cat(parts)


def _partials(q_shd: torch.Tensor, q_pos: torch.Tensor, q_doc: Optional[torch.Tensor],
              k_thd: torch.Tensor, v_thd: torch.Tensor, k_pos: torch.Tensor,
              k_doc: Optional[torch.Tensor], *, scale: float, causal: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row max [H, S], sum of exp [H, S], weighted values [H, S, D]) of the rows q against
    the keys k / v, float64, key chunk by key chunk (rows that see no key: -inf, 0, 0)."""
    group = q_shd.shape[1] // k_thd.shape[1]
    q = q_shd.double().transpose(0, 1) * scale  # [H, S, D]
    m = q.new_full(q.shape[:2], float("-inf"))
    z = q.new_zeros(q.shape[:2])
    o = torch.zeros_like(q)
    chunk = max(16, SCORE_ELEMENTS // (q.shape[0] * q.shape[1]))
    for c0 in range(0, k_thd.shape[0], chunk):
        keys = slice(c0, c0 + chunk)
        k = k_thd[keys].double().repeat_interleave(group, 1).transpose(0, 1)  # [H, C, D]
        v = v_thd[keys].double().repeat_interleave(group, 1).transpose(0, 1)
        s = q @ k.transpose(1, 2)  # [H, S, C]
        seen = torch.ones(s.shape[1:], dtype=torch.bool, device=s.device)
        if causal:
            seen &= k_pos[keys][None, :] <= q_pos[:, None]
        if q_doc is not None:
            seen &= k_doc[keys][None, :] == q_doc[:, None]
        s = s.masked_fill(~seen, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - safe[..., None])
        rescale = torch.exp(m - safe)
        z = z * rescale + p.sum(-1)
        o = o * rescale[..., None] + p @ v
        m = m_new
    return m, z, o


@torch.no_grad()
def parity_error(q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor,
                 out_bthd: torch.Tensor, meta: AttentionMeta, ctx: AttentionContext, *,
                 rows: int = ROWS, generator: Optional[torch.Generator] = None) -> float:
    """max|out - exact| / max|exact| over the sampled query rows of the first sequence of the
    batch, the same on every CP rank (all CP ranks call)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    t = q_bthd.shape[1]
    dev = q_bthd.device
    pos = zigzag_positions(t, cp_size=ctx.cp_size, cp_rank=ctx.cp_rank, device=dev)
    doc = None if meta.doc_ids_bt is None else meta.doc_ids_bt[0]
    picked = sample_rows(t, rows=rows, generator=gen).to(dev)
    n = picked.numel()
    q_all = _all_gather(q_bthd[0, picked], ctx)  # [S * CP, H, D]
    pos_all = _all_gather(pos[picked], ctx)
    doc_all = None if doc is None else _all_gather(doc[picked], ctx)
    scale = meta.softmax_scale if meta.softmax_scale is not None else q_bthd.shape[-1] ** -0.5
    m, z, o = _partials(q_all, pos_all, doc_all, k_bthd[0], v_bthd[0], pos, doc,
                        scale=scale, causal=meta.causal)
    if ctx.cp_size > 1:
        # merge the ranks' partials: rescale to the global row max, then sum
        m_all = m.clone()
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=ctx.cp_group)
        rescale = torch.exp(m - torch.where(torch.isinf(m_all), torch.zeros_like(m_all), m_all))
        z, o = z * rescale, o * rescale[..., None]
        dist.all_reduce(z, group=ctx.cp_group)
        dist.all_reduce(o, group=ctx.cp_group)
    exact = (o / z[..., None]).transpose(0, 1)[ctx.cp_rank * n:(ctx.cp_rank + 1) * n]
    got = out_bthd[0, picked].double()
    stats = torch.stack([(got - exact).abs().max(), exact.abs().max()])
    if ctx.cp_size > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=ctx.cp_group)
    return float(stats[0] / stats[1].clamp_min(1e-12))


def check_parity(q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor,
                 out_bthd: torch.Tensor, meta: AttentionMeta, ctx: AttentionContext, *,
                 backend: str, tol: Optional[float], where: str,
                 generator: Optional[torch.Generator] = None) -> float:
    """Raise ParityError when the error exceeds `tol` (None: by dtype); returns the error."""
    tol = default_tolerance(q_bthd.dtype) if tol is None else tol
    err = parity_error(q_bthd, k_bthd, v_bthd, out_bthd, meta, ctx, generator=generator)
    if not err <= tol:
        raise ParityError(f"attention parity check failed at {where}: attention.backend="
                          f"{backend!r} differs from exact attention by {err:.3e} (relative, "
                          f"on sampled query blocks), above attention.check_tol={tol:.1e} "
                          f"(cp={ctx.cp_size})")
    return err


class ParityCanary:
    """Wraps one softmax layer's attention function from outside the model (`install`): armed
    for one call (`arm`), it checks that call's output against exact attention on sampled
    query blocks (`check_parity`) and keeps the error (`last_error`); otherwise it only
    forwards. The sample changes from check to check (a generator seeded once, drawn the same
    on every rank)."""

    def __init__(self, fn: AttentionFn, *, where: str) -> None:
        self.fn = fn
        self.where = where
        self.backend = getattr(fn, "__name__", str(fn))
        self.armed = False
        self.tol: Optional[float] = None
        self.last_error: Optional[float] = None
        self.generator = torch.Generator().manual_seed(0)

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
                                           where=self.where, generator=self.generator)
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
