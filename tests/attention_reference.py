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
