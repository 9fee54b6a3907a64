"""Peer baselines for the attention benchmark: context-parallel attention as others write or
ship it, run on the same inputs as our backends.

Legend: B batch, T this rank's local length, H heads (K/V as many), D head dim, c the CP
degree; inputs and outputs are `[B, T, H, D]` like our backends, internal tensors
`[B, H, T, D]`, LSE `[B, H, T]` in the accumulation dtype (fp32; fp64 for fp64 inputs).

Both peers use the contiguous layout (`contiguous_shard`: rank r holds tokens
[r*T_global/c, (r+1)*T_global/c)), not our zigzag:

`plain_ring`: ring attention as people first write it (ring-flash-attention's basic,
non-zigzag `ring_flash_attn_func`, with plain torch math in place of the flash kernels). The
forward runs c steps: attend the local q to the K/V block held (`q @ k^T * scale`, causal mask
on the diagonal block, blocks wholly in the future skipped), merge by LSE in fp32, then pass
K/V to the next rank, blocking (`batch_isend_irecv`, waited at once: no overlap with compute,
where ring-flash-attention posts the exchange before the block).
The backward recomputes each block's probabilities from the saved out and LSE, rings K/V
around again and rings the fp32 dK/dV accumulators with them, so each block's gradients end
at their owner. With causal masking, rank r computes r + 1 blocks: the last rank does c
times the first one's work (the imbalance zigzag removes).

`ds_ulysses`: DeepSpeed-Ulysses as shipped: `deepspeed.sequence.layer.DistributedAttention`
(scatter heads, gather the sequence) over the CP group, around torch SDPA (`is_causal`) on
the gathered sequence, which DeepSpeed's contiguous split leaves in natural order.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

# one [B, H, T/c, T/c] score matrix in the accumulation dtype; a block's backward holds two
MAX_SCORES_BYTES = 2 * 2**30


class NotApplicable(Exception):
    """A backend that cannot run this configuration; the message is the table's reason."""


def contiguous_shard(x: torch.Tensor, *, cp_size: int, cp_rank: int, dim: int = 1
                     ) -> torch.Tensor:
    """Rank `cp_rank`'s contiguous 1/cp_size of `x` along `dim` (the peers' layout)."""
    if x.shape[dim] % cp_size:
        raise ValueError(f"sequence length {x.shape[dim]} is not divisible by cp={cp_size}")
    return x.chunk(cp_size, dim=dim)[cp_rank].contiguous()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _exchange(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Send `tensors` to the next rank and receive the previous rank's; blocking."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ranks = dist.get_process_group_ranks(group)
    nxt, prev = ranks[(rank + 1) % world], ranks[(rank - 1) % world]
    recv = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, prev, group) for r in recv]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return recv


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, *, diagonal: bool,
            causal: bool) -> torch.Tensor:
    """[B, H, Tq, Tk] scaled scores, future keys at -inf on a causal diagonal block."""
    s = q @ k.transpose(-2, -1)
    s.mul_(scale)
    if causal and diagonal:
        t = s.shape[-1]
        future = torch.ones(t, t, dtype=torch.bool, device=s.device).triu(1)
        s.masked_fill_(future, float("-inf"))
    return s


def _merge(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-weighted merge of two partial attentions over disjoint key sets."""
    new_lse = torch.logaddexp(lse, blk_lse)
    out = (out * (lse - new_lse).exp().unsqueeze(-1)
           + blk_out * (blk_lse - new_lse).exp().unsqueeze(-1))
    return out, new_lse


def _computed(src: int, rank: int, causal: bool) -> bool:
    """Whether rank `rank`'s queries see any key of rank `src`'s block (contiguous layout)."""
    return not causal or src <= rank


def _check_scores_size(q: torch.Tensor) -> None:
    b, h, t, _ = q.shape
    nbytes = b * h * t * t * torch.empty(0, dtype=_acc_dtype(q.dtype)).element_size()
    if nbytes > MAX_SCORES_BYTES:
        raise NotApplicable(
            f"plain_ring materializes [B, H, T/c, T/c] = [{b}, {h}, {t}, {t}] scores, "
            f"{nbytes / 2**30:.1f} GiB (2 live in backward) > {MAX_SCORES_BYTES / 2**30:.0f} "
            f"GiB limit")


def plain_ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group,
                       scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, T, D], lse [B, H, T]) in the accumulation dtype, on `[B, H, T, D]` inputs."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    acc = _acc_dtype(q.dtype)
    qa = q.to(acc)
    out: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
    for step in range(world):
        src = (rank - step) % world
        if _computed(src, rank, causal):
            s = _scores(qa, k.to(acc), scale, diagonal=step == 0, causal=causal)
            blk_lse = s.logsumexp(dim=-1)
            # in place: the [T, T] scores are the memory peak
            p = s.sub_(blk_lse.unsqueeze(-1)).exp_()
            blk_out = p @ v.to(acc)
            del s, p
            if out is None:
                out, lse = blk_out, blk_lse
            else:
                out, lse = _merge(out, lse, blk_out, blk_lse)
        if step + 1 < world:
            k, v = _exchange([k, v], group)
    assert out is not None and lse is not None, "the diagonal block is always computed"
    return out, lse


def plain_ring_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor, *, group, scale: float,
                        causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) `[B, H, T, D]` in the accumulation dtype, for this rank's q and own k/v."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    acc = _acc_dtype(q.dtype)
    qa, da = q.to(acc), dout.to(acc)
    delta = (da * out.to(acc)).sum(dim=-1, keepdim=True)
    dq = torch.zeros_like(qa)
    # gradients of the K/V block held, summed over the ranks that held it before
    dk = torch.zeros_like(qa)
    dv = torch.zeros_like(qa)
    for step in range(world):
        src = (rank - step) % world
        if _computed(src, rank, causal):
            ka, va = k.to(acc), v.to(acc)
            s = _scores(qa, ka, scale, diagonal=step == 0, causal=causal)
            p = s.sub_(lse.unsqueeze(-1)).exp_()
            dv += p.transpose(-2, -1) @ da
            ds = (da @ va.transpose(-2, -1)).sub_(delta).mul_(p)
            del s, p
            dq += (ds @ ka).mul_(scale)
            dk += (ds.transpose(-2, -1) @ qa).mul_(scale)
            del ds
        if step + 1 < world:
            k, v, dk, dv = _exchange([k, v, dk, dv], group)
        else:
            # after the last block the accumulators go home: the next rank owns that block
            dk, dv = _exchange([dk, dv], group)
    return dq, dk, dv


class _PlainRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor,
                group, scale: float, causal: bool) -> torch.Tensor:
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q_bthd, k_bthd, v_bthd))
        _check_scores_size(q)
        out_acc, lse = plain_ring_forward(q, k, v, group=group, scale=scale, causal=causal)
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.causal = group, scale, causal
        return out.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx: Any, dout_bthd: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout_bthd.transpose(1, 2).contiguous()
        grads = plain_ring_backward(dout, q, k, v, out, lse, group=ctx.group, scale=ctx.scale,
                                    causal=ctx.causal)
        dq, dk, dv = (g.to(q.dtype).transpose(1, 2).contiguous() for g in grads)
        return dq, dk, dv, None, None, None


def plain_ring_attention(q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor, *,
                         group, causal: bool = True, scale: Optional[float] = None
                         ) -> torch.Tensor:
    """Plain ring attention on this rank's contiguous shard.

    q, k, v [B, T, H, D] (as many K/V heads as query heads), any float dtype; returns
    [B, T, H, D] in q's dtype. Raises `NotApplicable` when one [B, H, T, T] score matrix in
    the accumulation dtype would exceed `MAX_SCORES_BYTES`.
    """
    if k_bthd.shape != q_bthd.shape or v_bthd.shape != q_bthd.shape:
        raise ValueError(f"plain_ring needs q, k, v of one shape, got {tuple(q_bthd.shape)}, "
                         f"{tuple(k_bthd.shape)}, {tuple(v_bthd.shape)}")
    scale = q_bthd.shape[-1] ** -0.5 if scale is None else scale
    return _PlainRingAttention.apply(q_bthd, k_bthd, v_bthd, group, scale, causal)


class _SdpaBthd:
    """DistributedAttention's local attention: torch SDPA on the gathered `[B, T, H, D]`."""

    def __init__(self, *, causal: bool) -> None:
        self.causal = causal

    def __call__(self, q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor
                 ) -> torch.Tensor:
        import torch.nn.functional as F

        q, k, v = (x.transpose(1, 2) for x in (q_bthd, k_bthd, v_bthd))
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal).transpose(1, 2)


def ds_ulysses_layer(group, *, causal: bool = True) -> Callable[..., torch.Tensor]:
    """DeepSpeed's `DistributedAttention` around torch SDPA over `group`: call it with
    (q, k, v, 0) on contiguous `[B, T, H, D]` shards (H divisible by the group size)."""
    from longtrain.parallel.deepspeed_comm import ensure_deepspeed_comm

    ensure_deepspeed_comm()
    from deepspeed.sequence.layer import DistributedAttention

    return DistributedAttention(_SdpaBthd(causal=causal), group, scatter_idx=2, gather_idx=1)


def ds_ulysses_attention(q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor, *,
                         group, causal: bool = True) -> torch.Tensor:
    """DeepSpeed-Ulysses on this rank's contiguous shard: q, k, v [B, T, H, D] -> [B, T, H, D]."""
    return ds_ulysses_layer(group, causal=causal)(q_bthd, k_bthd, v_bthd, 0)


PEERS = ("plain_ring", "ds_ulysses")


def peer_step(name: str, runtime: Any, qkvd_bthd: list[torch.Tensor], *, causal: bool
              ) -> Callable[[], None]:
    """A callable running one fwd+bwd of peer `name` on this rank's contiguous shards of
    q, k, v, dout [B, T, H, D] (the whole sequence)."""
    cp, rank, group = runtime.dims.cp, runtime.cp_rank, runtime.cp_group
    q, k, v, dout = (contiguous_shard(x, cp_size=cp, cp_rank=rank) for x in qkvd_bthd)
    if name == "plain_ring":
        def attend(*qkv: torch.Tensor) -> torch.Tensor:
            return plain_ring_attention(*qkv, group=group, causal=causal)
    elif name == "ds_ulysses":
        layer = ds_ulysses_layer(group, causal=causal)

        def attend(*qkv: torch.Tensor) -> torch.Tensor:
            return layer(*qkv, 0)
    else:
        raise ValueError(f"unknown peer {name!r}; choose from {list(PEERS)}")

    def step() -> None:
        ins = [x.detach().requires_grad_() for x in (q, k, v)]
        attend(*ins).backward(dout)

    return step
