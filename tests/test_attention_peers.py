"""The attention benchmark's peer baselines (benchmarks/peers.py: plain_ring, ds_ulysses) vs
dense attention on the unsharded sequence, and their analytic bytes sent vs counted bytes.

Every rank builds the same global q/k/v/dout from a seed, computes the explicit-softmax
reference with autograd, takes its contiguous shard (the peers' layout) of inputs and
reference, runs each peer on its shard, and asserts on its shard of out, dq, dk and dv.
"""

from __future__ import annotations

import pytest
import torch

from longtrain.parallel.spawn import run_distributed

# (name, B, T, H, D, causal, dtype)
CASES = [
    ("causal_fp64", 2, 256, 4, 16, True, torch.float64),
    ("causal_fp32", 1, 256, 4, 16, True, torch.float32),
    ("noncausal_fp64", 1, 64, 4, 8, False, torch.float64),
]
# one fwd+bwd with the bytes counted: B=1 as in the benchmark
SENT_SHAPE = dict(length=256, heads=4, head_dim=16)


def _attend(name: str, group):
    from benchmarks.peers import ds_ulysses_attention, plain_ring_attention

    fn = {"plain_ring": plain_ring_attention, "ds_ulysses": ds_ulysses_attention}[name]
    return lambda q, k, v, causal: fn(q, k, v, group=group, causal=causal)


def _check_outputs_and_grads(runtime) -> None:
    import zlib

    from attention_reference import FP64_RTOL, reference_attention
    from benchmarks.peers import contiguous_shard
    from conftest import FP32_RTOL, rel_err

    cp, r = runtime.dims.cp, runtime.cp_rank
    shard = lambda x: contiguous_shard(x, cp_size=cp, cp_rank=r)  # noqa: E731
    for name, b, t, h, d, causal, dtype in CASES:
        gen = torch.Generator().manual_seed(zlib.crc32(f"peers/{name}".encode()))
        q, k, v, dout = (torch.randn(b, t, h, d, generator=gen, dtype=dtype) for _ in range(4))
        ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = reference_attention(*ref_in, causal=causal)
        ref.backward(dout)
        want = {"out": ref, **{f"d{n}": x.grad for n, x in zip("qkv", ref_in)}}
        tol = FP64_RTOL if dtype == torch.float64 else FP32_RTOL
        for peer in ("plain_ring", "ds_ulysses"):
            local_in = [shard(x).clone().requires_grad_() for x in (q, k, v)]
            out = _attend(peer, runtime.cp_group)(*local_in, causal)
            assert out.dtype == dtype and out.shape == local_in[0].shape
            out.backward(shard(dout))
            got = {"out": out, **{f"d{n}": x.grad for n, x in zip("qkv", local_in)}}
            for what, mine in got.items():
                err = rel_err(mine.detach(), shard(want[what]).detach())
                assert err < tol, f"{peer} {name} rank {r}/{cp}: {what} rel err {err:.2e} > {tol}"


def _check_sent_bytes(runtime) -> None:
    from benchmarks.attention import sent_mib
    from benchmarks.lasp import counting_sends
    from benchmarks.peers import contiguous_shard

    cp, r = runtime.dims.cp, runtime.cp_rank
    n, h, d = SENT_SHAPE["length"], SENT_SHAPE["heads"], SENT_SHAPE["head_dim"]
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (contiguous_shard(torch.randn(1, n, h, d, generator=gen), cp_size=cp,
                                      cp_rank=r) for _ in range(4))
    for peer in ("plain_ring", "ds_ulysses"):
        ins = [x.clone().requires_grad_() for x in (q, k, v)]
        with counting_sends() as counts:
            _attend(peer, runtime.cp_group)(*ins, True).backward(dout)
        want = sent_mib(peer, **SENT_SHAPE, elt_bytes=4, cp=cp) * 2**20
        assert sum(counts.values()) == want, (peer, r, counts, want)


def _check_peers(runtime) -> None:
    _check_outputs_and_grads(runtime)
    _check_sent_bytes(runtime)


def test_peers_match_dense_reference_and_their_sent_bytes():
    run_distributed(_check_peers, world_size=2, cp=2)


def test_plain_ring_declines_scores_over_its_limit():
    from benchmarks.peers import MAX_SCORES_BYTES, NotApplicable, _check_scores_size

    # [B, H, T, T] fp32 scores: 8 heads at T/c = 16384 is 8 GiB, at 8192 exactly 2 GiB
    assert MAX_SCORES_BYTES == 2 * 2**30
    _check_scores_size(torch.empty(1, 8, 8192, 64, device="meta"))
    with pytest.raises(NotApplicable, match="16384"):
        _check_scores_size(torch.empty(1, 8, 16384, 64, device="meta"))
