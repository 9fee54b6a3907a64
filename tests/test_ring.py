"""Ring attention vs dense attention on the unsharded sequence: outputs and dq/dk/dv.

Every rank builds the same global q/k/v (and document ids) from a seed, computes the
explicit-softmax reference with autograd, shards inputs and reference with the production
layout function, runs the ring on its shard, and asserts on its shard of out and grads.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from attention_reference import random_docs, reference_attention
from conftest import FP32_RTOL, rel_err
from longtrain.parallel.spawn import run_distributed

# (name, B, T, Hq, Hkv, D, causal, docs, dtype)
CASES = [
    ("causal_gqa_fp64", 2, 48, 4, 2, 16, True, False, torch.float64),
    ("causal_mqa_docs_fp64", 1, 48, 4, 1, 16, True, True, torch.float64),
    ("noncausal_docs_fp64", 1, 48, 2, 2, 8, False, True, torch.float64),
    ("noncausal_fp32", 1, 40, 2, 1, 16, False, False, torch.float32),
    ("causal_docs_fp32", 2, 40, 4, 2, 16, True, True, torch.float32),
]


def _check_ring(runtime, cases) -> None:
    from longtrain.attention.ring import ring_attention_fn
    from longtrain.parallel.layout import split_for_cp

    cp, r = runtime.dims.cp, runtime.cp_rank
    shard = lambda x: split_for_cp(x, cp_size=cp, cp_rank=r, dim=1)  # noqa: E731
    for name, b, t, hq, hkv, d, causal, docs, dtype in cases:
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        q = torch.randn(b, t, hq, d, generator=gen, dtype=dtype)
        k = torch.randn(b, t, hkv, d, generator=gen, dtype=dtype)
        v = torch.randn(b, t, hkv, d, generator=gen, dtype=dtype)
        dout = torch.randn(b, t, hq, d, generator=gen, dtype=dtype)
        doc = random_docs(b, t, gen=gen) if docs else None
        ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = reference_attention(*ref_in, causal=causal, doc_bt=doc)
        ref.backward(dout)
        local_in = [shard(x).clone().requires_grad_() for x in (q, k, v)]
        out = ring_attention_fn(*local_in, group=runtime.cp_group, causal=causal,
                                doc_bt=None if doc is None else shard(doc))
        out.backward(shard(dout))
        tol = 1e-10 if dtype == torch.float64 else FP32_RTOL
        checks = {"out": (out, shard(ref))}
        for n, mine, full in zip("qkv", local_in, ref_in):
            checks[f"d{n}"] = (mine.grad, shard(full.grad))
        for what, (mine, want) in checks.items():
            err = rel_err(mine.detach(), want.detach())
            assert err < tol, f"{name} rank {r}/{cp}: {what} rel err {err:.2e} > {tol}"


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_matches_dense_reference(cp):
    run_distributed(_check_ring, world_size=cp, cp=cp, args=(CASES,))
