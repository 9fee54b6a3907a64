"""The attention test oracle: explicit masked softmax on the unsharded sequence, and random
packed-document ids. Shared by the context-parallel attention tests."""

from __future__ import annotations

import torch


def reference_attention(q_bthd, k_bthd, v_bthd, *, causal: bool, doc_bt=None):
    """Explicit masked softmax (no fused kernel): [B, T, Hq, D] from GQA inputs."""
    groups = q_bthd.shape[2] // k_bthd.shape[2]
    k = k_bthd.repeat_interleave(groups, dim=2)
    v = v_bthd.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q_bthd, k) * q_bthd.shape[-1] ** -0.5
    t = q_bthd.shape[1]
    allowed = torch.ones(t, t, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(q_bthd.shape[0], t, t)
    if doc_bt is not None:
        allowed = allowed & (doc_bt[:, :, None] == doc_bt[:, None, :])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def random_docs(b: int, t: int, *, gen: torch.Generator) -> torch.Tensor:
    """Document ids with boundaries at random places (crossing shard boundaries)."""
    rows = []
    for _ in range(b):
        cuts = sorted(torch.randint(1, t, (3,), generator=gen).tolist())
        ids = torch.zeros(t, dtype=torch.long)
        for c in cuts:
            ids[c:] += 1
        rows.append(ids)
    return torch.stack(rows)


FP64_RTOL = 1e-10


def check_sharded_attention(runtime, attend, cases, *, label: str) -> None:
    """For each case (name, B, T, Hq, Hkv, D, causal, docs, dtype): build global inputs from a
    seed, run `reference_attention` with autograd, run `attend(q, k, v, causal, doc)` on this
    rank's zigzag shards, and assert on the shard of the output and of dq/dk/dv."""
    import zlib

    from conftest import FP32_RTOL, rel_err
    from longtrain.parallel.layout import split_for_cp

    cp, r = runtime.dims.cp, runtime.cp_rank
    shard = lambda x: split_for_cp(x, cp_size=cp, cp_rank=r, dim=1)  # noqa: E731
    for name, b, t, hq, hkv, d, causal, docs, dtype in cases:
        gen = torch.Generator().manual_seed(zlib.crc32(f"{label}/{name}".encode()))
        q, k, v, dout = (torch.randn(b, t, h, d, generator=gen, dtype=dtype)
                         for h in (hq, hkv, hkv, hq))
        doc = random_docs(b, t, gen=gen) if docs else None
        ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = reference_attention(*ref_in, causal=causal, doc_bt=doc)
        ref.backward(dout)
        local_in = [shard(x).clone().requires_grad_() for x in (q, k, v)]
        out = attend(*local_in, causal, None if doc is None else shard(doc))
        assert out.dtype == dtype and out.shape == local_in[0].shape
        out.backward(shard(dout))
        tol = FP64_RTOL if dtype == torch.float64 else FP32_RTOL
        checks = {"out": (out, shard(ref))}
        for n, mine, full in zip("qkv", local_in, ref_in):
            checks[f"d{n}"] = (mine.grad, shard(full.grad))
        for what, (mine, want) in checks.items():
            err = rel_err(mine.detach(), want.detach())
            assert err < tol, f"{label} {name} rank {r}/{cp}: {what} rel err {err:.2e} > {tol}"
