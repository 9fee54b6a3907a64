"""attention=s2 (S2-Attention) in the model and under context parallelism: every layout's
output and gradients equal dense attention with the explicit per-head block mask on the whole
sequence (float64), at CP = 1, 2, 4 and TP = 2 x CP = 2, with packed documents; each rank
receives only the K/V blocks its heads can see; training at CP = 2 follows the CP = 1 curve.

Legend: B batch, T tokens, Hq / Hkv query / key-value heads, D head dim, bs block size.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from longtrain.parallel.spawn import run_distributed
from sp_helpers import doc_ids, float64_inputs, rank_slice, rel, with_fields

SEED = 5
B, T, HQ, HKV, D = 2, 256, 4, 2, 8
BS = 16  # 16 blocks: 2 per chunk at CP = 4
OP_RTOL = 1e-10
# (local_blocks, vert_stride, homo_head, num_dense_heads)
PATTERNS = {"strided": (2, 4, False, 0), "homo+dense": (1, 4, True, 1)}
DOC_STARTS = ([0, 40, 64, 200], [0])


def _pattern(name: str):
    from longtrain_kernels.s2_attn import S2Pattern

    local, stride, homo, dense = PATTERNS[name]
    return S2Pattern(num_heads=HQ, block_size=BS, local_blocks=local, vert_stride=stride,
                     homo_head=homo, num_dense_heads=dense)


def _doc_ids() -> torch.Tensor:
    return doc_ids(DOC_STARTS, T)


def _inputs() -> dict[str, torch.Tensor]:
    return float64_inputs(SEED, {"q": (B, T, HQ, D), "k": (B, T, HKV, D), "v": (B, T, HKV, D),
                                 "w": (B, T, HQ, D)})


def _reference(x: dict[str, torch.Tensor], pattern: Any, docs: bool) -> dict[str, torch.Tensor]:
    """Dense softmax attention with the explicit mask: causal, same document, and the
    pattern's block mask of each global head; output and gradients of sum(o * w)."""
    q, k, v = (x[n].clone().requires_grad_() for n in "qkv")
    nb = T // BS
    allowed = pattern.block_mask(nb, nb, range(HQ)).repeat_interleave(BS, 1)
    allowed = allowed.repeat_interleave(BS, 2)[None] & torch.ones(T, T, dtype=torch.bool).tril()
    if docs:
        doc = _doc_ids()
        allowed = allowed & (doc[:, None, :, None] == doc[:, None, None, :])
    mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    group = HQ // HKV
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(group, 2).transpose(1, 2),
        v.repeat_interleave(group, 2).transpose(1, 2), attn_mask=mask).transpose(1, 2)
    (o * x["w"]).sum().backward()
    return {"o": o.detach(), "q": q.grad, "k": k.grad, "v": v.grad}


def _check(rt: Any) -> None:
    """Each rank: its heads (TP) and zigzag shard (CP) of the s2 backend's output and
    gradients equal the same slices of the reference."""
    from longtrain.attention.base import AttentionMeta
    from longtrain.attention.s2 import make_s2_attention

    from longtrain.attention import s2 as s2_module
    from longtrain.parallel.layout import zigzag_chunk_ids

    d, mine = rt.dims, rank_slice(rt)
    qh, kh, shard, ctx = mine.heads(HQ), mine.heads(HKV), mine.shard, mine.ctx
    x = _inputs()
    kept: list[int] = []
    collect = s2_module._collect

    def counting_collect(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = collect(*args, **kwargs)
        kept.append(out.shape[1])
        return out

    s2_module._collect = counting_collect
    for name in PATTERNS:
        pattern = _pattern(name)
        fn = make_s2_attention(pattern)
        kept.clear()
        for docs in (False, True):
            ref = _reference(x, pattern, docs)
            meta = AttentionMeta(doc_ids_bt=shard(_doc_ids()) if docs else None,
                                 head_offset=qh.start)
            q = shard(x["q"][:, :, qh]).clone().requires_grad_()
            k = shard(x["k"][:, :, kh]).clone().requires_grad_()
            v = shard(x["v"][:, :, kh]).clone().requires_grad_()
            o = fn(q, k, v, meta, ctx)
            (o * shard(x["w"][:, :, qh])).sum().backward()
            got = {"o": (o, qh), "q": (q.grad, qh), "k": (k.grad, kh), "v": (v.grad, kh)}
            for what, (value, heads) in got.items():
                err = rel(value.detach(), shard(ref[what][:, :, heads]))
                assert err < OP_RTOL, (f"{name} docs={docs} tp={d.tp} cp={d.cp} rank "
                                       f"{rt.rank}: {what} rel err {err:.2e}")
        if d.cp > 1:
            # K, V (and the document ids) are kept only for the blocks the rank's heads read:
            # with two of the four sparse heads (TP = 2) fewer than the prefix up to its last
            # chunk
            prefix = (zigzag_chunk_ids(d.cp, mine.ctx.cp_rank)[1] + 1) * T // (2 * d.cp)
            assert kept and max(kept) <= prefix, (kept, prefix)
            if name == "strided" and d.tp == 2:
                assert max(kept) < prefix, (kept, prefix)
    s2_module._collect = collect


@pytest.mark.parametrize("world,tp,cp", [(1, 1, 1), (2, 1, 2), (4, 1, 4), (4, 2, 2)],
                         ids=["cp1", "cp2", "cp4", "tp2xcp2"])
def test_s2_equals_the_masked_reference(world: int, tp: int, cp: int) -> None:
    run_distributed(_check, world_size=world, tp=tp, cp=cp)


def test_a_partial_last_block_is_padded_at_cp1() -> None:
    """Lengths that are not whole blocks (eval prompts) give the reference's rows."""
    from longtrain.attention.base import AttentionContext, AttentionMeta
    from longtrain.attention.s2 import make_s2_attention

    x = _inputs()
    pattern = _pattern("strided")
    ref = _reference(x, pattern, True)
    n = T - 5
    q, k, v = (x[name][:, :n].clone().requires_grad_() for name in "qkv")
    o = make_s2_attention(pattern)(q, k, v, AttentionMeta(doc_ids_bt=_doc_ids()[:, :n]),
                                   AttentionContext())
    assert o.shape == (B, n, HQ, D) and rel(o.detach(), ref["o"][:, :n]) < OP_RTOL
    o.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_ranks_receive_only_the_blocks_their_heads_see() -> None:
    from longtrain.attention.s2 import s2_needed_fraction
    from longtrain_kernels.s2_attn import S2Pattern

    # 16 heads, stride 8: all heads on one rank see every phase, so under CP alone a rank
    # needs every earlier block, as dense causal attention does (3/4 of a ring's traffic:
    # no rank needs the chunks after its own) ...
    pattern = S2Pattern(num_heads=16, block_size=64, local_blocks=4, vert_stride=8)
    dense = S2Pattern(num_heads=16, block_size=64, local_blocks=4, vert_stride=8,
                      num_dense_heads=16)
    every = tuple(range(16))
    causal = s2_needed_fraction(dense, every, cp=4, chunk_blocks=16)
    assert causal == pytest.approx(0.75)
    assert s2_needed_fraction(pattern, every, cp=4, chunk_blocks=16) == pytest.approx(causal)
    # ... TP = 8 leaves 2 heads (2 phases of 8) per rank: about a quarter of that
    frac = s2_needed_fraction(pattern, (0, 1), cp=4, chunk_blocks=16)
    assert 0.2 * causal < frac < 0.35 * causal, frac
    # homo_head: one phase for all heads, an eighth plus the local windows
    homo = S2Pattern(num_heads=16, block_size=64, local_blocks=4, vert_stride=8, homo_head=True,
                     num_dense_heads=0)
    assert s2_needed_fraction(homo, every, cp=4, chunk_blocks=16) < 0.2 * causal


# --------------------------------------------------------------------------- training

STEPS = 20
CURVE_RTOL = 1e-4


def _s2_curve(rt: Any, out_path: str) -> None:
    from longtrain.config.schema import RunConfig
    from longtrain.planning.validate import validate
    from longtrain.train.loop import TrainState, train

    cfg = RunConfig()
    d = rt.dims
    cfg.parallel.world_size, cfg.parallel.tp, cfg.parallel.cp = d.world_size, d.tp, d.cp
    cfg.attention.backend = "s2"
    s2 = cfg.attention.s2
    s2.block_size, s2.local_blocks, s2.vert_stride, s2.dense_first = 16, 2, 4, 1
    cfg.data.seq_len, cfg.data.docs_per_seq = 384, 2
    cfg.data.batch_size, cfg.data.micro_batch_size = 2, 1
    cfg.train.steps, cfg.optim.warmup_steps, cfg.optim.lr = STEPS, 2, 1e-3
    cfg.checkpoint.resume, cfg.checkpoint.every, cfg.checkpoint.save_final = "never", 0, False
    validate(cfg)
    state = TrainState.create(cfg, rt)
    # layer 0 dense (dense_first=1), layer 3 dense (every 4th), layers 1-2 sparse
    names = [layer.attn.attention.__name__ for layer in state.model.layers]
    assert names == ["dense_or_ring", "s2_attention", "s2_attention", "dense_or_ring"], names
    metrics = list(train(cfg, rt, state=state))
    if rt.rank == 0:
        torch.save([m["loss"] for m in metrics], out_path)


def test_s2_training_at_cp2_matches_cp1(tmp_path) -> None:
    curves = []
    for world, tp, cp in [(1, 1, 1), (4, 2, 2)]:
        path = os.path.join(tmp_path, f"{world}.pt")
        run_distributed(_s2_curve, world_size=world, tp=tp, cp=cp, args=(path,))
        curves.append(torch.load(path, weights_only=False))
    ref, got = curves
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    assert worst < CURVE_RTOL, (worst, got, ref)
    assert ref[-1] < 0.8 * ref[0], "the curve must actually train"


@pytest.mark.parametrize("change,expected", [
    ({"attention.backend": "s2", "data.seq_len": 1000},
     "data.seq_len=1000 must be a multiple of attention.s2.block_size=64"),
    ({"attention.backend": "s2", "parallel.cp": 2, "data.seq_len": 192},
     "data.seq_len=192 must be a multiple of attention.s2.block_size=64 * 2 * parallel.cp=2 = 256"),
    ({"attention.backend": "s2", "data.seq_len": 1024},
     "attention.s2: the heads' vertical phases leave parts of the context unseen"),
])
def test_bad_s2_settings_name_the_fields(change: dict, expected: str) -> None:
    from longtrain.config.schema import RunConfig
    from longtrain.planning.validate import problems

    found = problems(with_fields(RunConfig(), change))
    assert any(expected in p for p in found), found
