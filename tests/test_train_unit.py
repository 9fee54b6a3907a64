"""Unit tests of the training pieces: LR schedule, parallel dims, the CP sequence layout,
passkey data, DP/micro-batch partitioning, and bf16 with fp32 master weights.

Only the bf16 test starts processes (a world of 1: megatron's layers need its groups).
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

import pytest
import torch

from conftest import BF16_RTOL, rel_err
from longtrain.config.schema import DataConfig, ModelConfig, OptimConfig, RopeConfig
from longtrain.data.loader import global_sequences, iterate, micro_batches
from longtrain.data.synthetic import passkey_sample, passkey_tokens
from longtrain.data.tokenizer import ByteTokenizer
from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.layout import split_for_cp, unsplit_from_cp, zigzag_chunk_ids
from longtrain.parallel.spawn import run_distributed
from longtrain.train.lr import lr_at

# ---------------------------------------------------------------- learning-rate schedule


def test_lr_warmup_is_linear_up_to_peak() -> None:
    cfg = OptimConfig(lr=2e-3, warmup_steps=10, schedule="cosine")
    lrs = [lr_at(s, cfg=cfg, total_steps=100) for s in range(10)]
    assert lrs[0] == pytest.approx(2e-3 / 10)
    assert lrs[-1] == pytest.approx(2e-3)
    steps = [b - a for a, b in zip(lrs, lrs[1:])]
    assert steps == pytest.approx([2e-3 / 10] * 9)


def test_lr_cosine_decays_to_min_ratio_at_the_end() -> None:
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    total = 110
    floor = cfg.lr * cfg.min_lr_ratio
    lrs = [lr_at(s, cfg=cfg, total_steps=total) for s in range(10, total + 1)]
    assert lrs[0] == pytest.approx(cfg.lr)
    assert all(b < a for a, b in zip(lrs, lrs[1:])), "cosine must decrease strictly"
    # Half way through the decay the cosine is at the mean of peak and floor.
    assert lr_at(60, cfg=cfg, total_steps=total) == pytest.approx((cfg.lr + floor) / 2)
    assert lrs[-1] == pytest.approx(floor)
    assert min(lrs) >= floor - 1e-15
    # Past the end it stays at the floor.
    assert lr_at(total + 50, cfg=cfg, total_steps=total) == pytest.approx(floor)


def test_lr_constant_after_warmup_and_no_warmup() -> None:
    cfg = OptimConfig(lr=5e-4, warmup_steps=4, schedule="constant")
    assert lr_at(0, cfg=cfg, total_steps=50) == pytest.approx(5e-4 / 4)
    assert [lr_at(s, cfg=cfg, total_steps=50) for s in (3, 4, 25, 49, 80)] == [5e-4] * 5
    cosine = OptimConfig(lr=5e-4, warmup_steps=0, schedule="cosine")
    assert lr_at(0, cfg=cosine, total_steps=50) == pytest.approx(5e-4)


# ---------------------------------------------------------------- parallel dims


@pytest.mark.parametrize("dims,expected", [
    (ParallelDims(3, 2, 1), ["parallel.world_size=3", "parallel.tp * parallel.cp = 2 * 1 = 2"]),
    (ParallelDims(8, 2, 3), ["parallel.world_size=8", "2 * 3 = 6"]),
    (ParallelDims(0, 1, 1), ["parallel.world_size=0 must be >= 1"]),
    (ParallelDims(4, 0, 1), ["parallel.tp=0 must be >= 1"]),
    (ParallelDims(4, 1, -2), ["parallel.cp=-2 must be >= 1"]),
])
def test_parallel_dims_problems_name_fields_and_values(dims: ParallelDims,
                                                       expected: list[str]) -> None:
    problems = dims.problems()
    assert len(problems) == 1
    for fragment in expected:
        assert fragment in problems[0]


def test_parallel_dims_valid_mesh_and_megatron_rank_order() -> None:
    dims = ParallelDims(8, 2, 2)
    assert dims.problems() == [] and dims.dp == 2
    coords = [dims.coords(r) for r in range(8)]
    # TP fastest, then CP, then DP; every (tp, cp, dp) exactly once.
    assert coords[:5] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1)]
    assert sorted(coords) == sorted(itertools.product(range(2), range(2), range(2)))


def test_init_parallel_refuses_bad_dims_before_joining() -> None:
    from longtrain.parallel.runtime import init_parallel

    with pytest.raises(ValueError, match=r"parallel\.world_size=3"):
        init_parallel(ParallelDims(3, 2, 1), rank=0, init_method="file:///nonexistent/store")


# ---------------------------------------------------------------- CP sequence layout


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_cp_split_round_trip_and_zigzag_ownership(cp: int) -> None:
    gen = torch.Generator().manual_seed(cp)
    t = 2 * cp * 3
    x = torch.randn(2, t, 5, generator=gen)
    shards = [split_for_cp(x, cp_size=cp, cp_rank=r, dim=1) for r in range(cp)]
    assert all(s.shape == (2, t // cp, 5) for s in shards)
    assert torch.equal(unsplit_from_cp(shards, dim=1), x)
    chunks = x.chunk(2 * cp, dim=1)
    for r, shard in enumerate(shards):
        first, second = zigzag_chunk_ids(cp, r)
        assert (first, second) == (r, 2 * cp - 1 - r)
        assert torch.equal(shard, torch.cat([chunks[r], chunks[2 * cp - 1 - r]], dim=1))
    # Positions are split by the same function: every position lands on exactly one rank.
    positions = torch.arange(t)[None]
    held = torch.cat([split_for_cp(positions, cp_size=cp, cp_rank=r) for r in range(cp)], dim=1)
    assert sorted(held.flatten().tolist()) == list(range(t))


def test_cp_split_rejects_length_not_divisible_by_2cp() -> None:
    with pytest.raises(ValueError, match=r"10 is not divisible by 2\*cp = 4"):
        split_for_cp(torch.zeros(1, 10), cp_size=2, cp_rank=0)


# ---------------------------------------------------------------- passkey data


def test_passkey_is_a_function_of_seed_and_index() -> None:
    a = passkey_sample(seq_len=300, seed=5, index=17)
    b = passkey_sample(seq_len=300, seed=5, index=17)
    assert a == b
    keys = {passkey_sample(seq_len=300, seed=5, index=i).key for i in range(8)}
    assert len(keys) == 8, "different indices must hide different keys"
    assert passkey_sample(seq_len=300, seed=6, index=17).key != a.key
    rows = passkey_tokens(seq_len=300, seed=5, indices=[17, 3])
    assert rows.dtype == torch.long and rows.shape == (2, 301)
    assert rows[0].tolist() == a.ids


@pytest.mark.parametrize("seq_len", [190, 256, 1000, 4097])
def test_passkey_length_needle_and_answer(seq_len: int) -> None:
    tok = ByteTokenizer()
    for index in range(3):
        s = passkey_sample(seq_len=seq_len, seed=1, index=index)
        assert len(s.ids) == seq_len + 1
        assert max(s.ids) < tok.vocab_size and s.ids[0] == tok.bos_id and s.ids[-1] == tok.eos_id
        assert re.fullmatch(r"\d{5}", s.key) and 0.0 <= s.depth < 1.0
        text = tok.decode(s.ids)
        assert text.count(f"The pass key is {s.key}.") == 2, "needle and answer"
        assert text.endswith(f"What is the pass key? The pass key is {s.key}.")
        assert tok.decode(s.ids[s.answer_start:s.answer_start + 5]) == s.key
        # The needle sits before the question, the answer after it.
        assert text.index(f"is {s.key}. Remember it.") < text.index("What is the pass key?")


def test_passkey_too_short_names_seq_len_and_the_minimum() -> None:
    with pytest.raises(ValueError, match=r"data\.seq_len=100 .*needs data\.seq_len >= (\d+)") as info:
        passkey_sample(seq_len=100, seed=0, index=0)
    minimum = int(re.search(r"needs data\.seq_len >= (\d+)", str(info.value)).group(1))
    assert len(passkey_sample(seq_len=minimum, seed=0, index=0).ids) == minimum + 1
    with pytest.raises(ValueError, match=f"data.seq_len={minimum - 1} "):
        passkey_sample(seq_len=minimum - 1, seed=0, index=0)


# ---------------------------------------------------------------- DP / micro-batch partition


@pytest.mark.parametrize("dp,micro,cp", [(1, 1, 1), (1, 4, 1), (2, 1, 1), (2, 2, 1),
                                         (4, 2, 1), (2, 2, 2)])
def test_micro_batches_partition_the_global_batch(dp: int, micro: int, cp: int) -> None:
    cfg = DataConfig(seq_len=192, batch_size=8, micro_batch_size=micro, seed=4)
    step = 3
    expected = global_sequences(cfg, list(range(step * 8, step * 8 + 8)))
    rows_tokens, rows_labels = [], []
    for dp_rank in range(dp):
        per_cp = [micro_batches(cfg, step=step, dp_size=dp, dp_rank=dp_rank, cp_size=cp,
                                cp_rank=c) for c in range(cp)]
        assert all(len(m) == 8 // (dp * micro) for m in per_cp)
        for mbs in zip(*per_cp):
            assert all(mb.tokens_bt.shape == (micro, 192 // cp) for mb in mbs)
            rows_tokens.append(unsplit_from_cp([mb.tokens_bt for mb in mbs]))
            rows_labels.append(unsplit_from_cp([mb.labels_bt for mb in mbs]))
            positions = unsplit_from_cp([mb.positions_bt for mb in mbs])
            assert torch.equal(positions, torch.arange(192).expand(micro, 192))
    # Concatenated in (dp rank, micro-batch) order the shards are exactly the global batch:
    # every sequence once, none twice.
    assert torch.equal(torch.cat(rows_tokens), expected[:, :-1])
    assert torch.equal(torch.cat(rows_labels), expected[:, 1:])


def test_iterate_walks_consecutive_steps() -> None:
    cfg = DataConfig(seq_len=192, batch_size=4, micro_batch_size=2, seed=2)
    stream = iterate(cfg, start_step=5, dp_size=2, dp_rank=1, cp_size=1, cp_rank=0)
    for step in (5, 6):
        got = next(stream)
        want = micro_batches(cfg, step=step, dp_size=2, dp_rank=1, cp_size=1, cp_rank=0)
        assert [torch.equal(a.tokens_bt, b.tokens_bt) for a, b in zip(got, want)] == [True]
    step0 = micro_batches(cfg, step=0, dp_size=1, dp_rank=0, cp_size=1, cp_rank=0)
    step1 = micro_batches(cfg, step=1, dp_size=1, dp_rank=0, cp_size=1, cp_rank=0)
    assert not torch.equal(step0[0].tokens_bt, step1[0].tokens_bt)


# ---------------------------------------------------------------- bf16 + fp32 master weights

_BF16_MODEL = ModelConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2)


def _bf16_worker(rt: Any) -> None:
    from longtrain.attention.base import get_attention
    from longtrain.model.llama import LlamaModel
    from longtrain.model.sharding import init_weights
    from longtrain.train.loss import token_loss_sum
    from longtrain.train.optim import Optimizer

    def build(dtype: torch.dtype) -> LlamaModel:
        model = LlamaModel(_BF16_MODEL, RopeConfig(), attention=get_attention("dense"), tp=1,
                           tp_rank=0, dtype=dtype)
        init_weights(model, seed=3)
        return model

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, _BF16_MODEL.vocab_size, (2, 32), generator=gen)
    labels = torch.randint(0, _BF16_MODEL.vocab_size, (2, 32), generator=gen)

    # fp32: no copies, the optimizer steps the parameters themselves.
    fp32 = build(torch.float32)
    opt32 = Optimizer(fp32, OptimConfig(lr=1e-2, warmup_steps=0), total_steps=10)
    assert not opt32.mixed and all(m is p for m, p in zip(opt32.master, opt32.params))

    model = build(torch.bfloat16)
    opt = Optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0), total_steps=10)
    assert opt.mixed
    for p, m in zip(opt.params, opt.master):
        assert p.dtype == torch.bfloat16 and m.dtype == torch.float32
        assert m.data_ptr() != p.data_ptr() and torch.equal(m, p.float())

    # bf16 computes the same function as fp32 up to bf16 rounding.
    logits = model(tokens)
    assert logits.dtype == torch.bfloat16
    err = rel_err(logits.float(), fp32(tokens).detach())
    assert err <= BF16_RTOL, f"bf16 logits rel err {err:.2e}"
    loss = token_loss_sum(logits, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    (loss / labels.numel()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in opt.params)

    before = [p.detach().clone() for p in opt.params]
    stats = opt.step(0, tp_group=rt.tp_group)
    assert stats["lr"] == pytest.approx(1e-2) and stats["grad_norm"] > 0
    changed = sum(int((p != b).sum()) for p, b in zip(opt.params, before))
    assert changed > 0.5 * sum(p.numel() for p in opt.params), "a step must move bf16 params"
    for p, m in zip(opt.params, opt.master):
        assert p.dtype == torch.bfloat16 and m.dtype == torch.float32
        # bf16 weights are the rounded masters; the masters keep the bits bf16 drops.
        assert torch.equal(p, m.to(torch.bfloat16))
    assert any(not torch.equal(m, p.float()) for p, m in zip(opt.params, opt.master))

    # Updates far below bf16 resolution accumulate in the masters alone.
    small = Optimizer(model, OptimConfig(lr=1e-6, warmup_steps=0, weight_decay=0.0), total_steps=1)
    masters = [m.clone() for m in small.master]
    weights = [p.detach().clone() for p in small.params]
    for p in small.params:
        p.grad = torch.ones_like(p)
    small.step(0, tp_group=rt.tp_group)
    assert all(bool((m != m0).all()) for m, m0 in zip(small.master, masters))
    unchanged = sum(int((p == w).sum()) for p, w in zip(small.params, weights))
    assert unchanged > 0.95 * sum(w.numel() for w in weights)


def test_bf16_keeps_fp32_master_weights() -> None:
    run_distributed(_bf16_worker, world_size=1, tp=1)


def test_lr_cosine_with_zero_floor_halves_at_mid_decay() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.0)
    # Cosine with a zero floor: cos(pi * 1/2) at the middle of the decay.
    assert lr_at(2 + 4, cfg=cfg, total_steps=2 + 8) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
