"""Megatron sequence parallelism (`parallel.sequence_parallel`, longtrain.parallel.sequence):
at TP = 2 and TP = 2 x CP = 2, with packed documents and a hybrid (linear + softmax) model, the
loss and every gradient equal the model without it (after the norms' gradients are summed
over TP); the activations a layer saves for the backward shrink (the norms' and residuals'
inputs hold T / tp tokens); a sequence that does not split over TP is named."""

from __future__ import annotations

import os

import pytest
import torch

from longtrain.parallel.spawn import run_distributed

T, VOCAB = 64, 96


def _run(rt, sp: bool, pattern: str) -> dict:
    from longtrain.attention.base import get_attention
    from longtrain.config.schema import ModelConfig, RopeConfig
    from longtrain.model.llama import LlamaModel
    from longtrain.model.sharding import canonical_state_dict, init_weights
    from longtrain.parallel.layout import split_for_cp
    from longtrain.train.build import attention_context
    from longtrain.train.loss import chunked_loss_sum
    from longtrain.train.optim import sum_sequence_parallel

    cfg = ModelConfig(vocab_size=VOCAB, num_layers=2, layer_pattern=pattern)
    attention = get_attention("ring" if rt.dims.cp > 1 else "dense")
    model = LlamaModel(cfg, RopeConfig(), attention=attention, tp=rt.dims.tp,
                       tp_rank=rt.tp_rank, sequence_parallel=sp)
    init_weights(model, seed=3)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (2, T), generator=gen)
    doc = (torch.arange(T) >= 23).long() + (torch.arange(T) >= 50).long()
    doc = doc[None].expand(2, -1)
    positions = torch.cat([torch.arange(23), torch.arange(27), torch.arange(14)])[None].expand(2, -1)
    shard = lambda x: split_for_cp(x, cp_size=rt.dims.cp, cp_rank=rt.cp_rank)  # noqa: E731
    saved = [0]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # activations only: not the weights (however a layer saves them)
        if t.is_floating_point() and t.untyped_storage().data_ptr() not in weights:
            saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model(shard(tokens), positions_bt=shard(positions), doc_ids_bt=shard(doc),
                       seq_len=T, ctx=attention_context(rt), head=False)
        loss = chunked_loss_sum(model.logits, hidden, shard(tokens), chunk=16)
    loss.backward()
    params = [p for p in model.parameters()]
    sum_sequence_parallel(params, [p.grad for p in params], tp_group=rt.tp_group)
    total = loss.detach().clone()
    torch.distributed.all_reduce(total, group=rt.cp_group)
    return {"loss": float(total), "saved": saved[0],
            "grads": canonical_state_dict(model, group=rt.tp_group, grads=True)}


def _worker(rt, patterns: tuple[str, ...], path: str) -> None:
    for pattern in patterns:
        off, on = _run(rt, False, pattern), _run(rt, True, pattern)
        torch.save({"off": off, "on": on}, f"{path}-{pattern or 'softmax'}.{rt.rank}")


@pytest.mark.parametrize("world,tp,cp,patterns", [(2, 2, 1, ("", "LS")), (4, 2, 2, ("",))],
                         ids=["tp2-softmax-and-hybrid", "tp2xcp2"])
def test_sequence_parallel_equals_the_plain_tensor_parallel_model(tmp_path, world, tp, cp,
                                                                   patterns):
    path = os.path.join(tmp_path, "r")
    run_distributed(_worker, world_size=world, tp=tp, cp=cp, args=(patterns, path))
    for rank, pattern in ((r, p) for r in range(world) for p in patterns):
        got = torch.load(f"{path}-{pattern or 'softmax'}.{rank}", weights_only=False)
        off, on = got["off"], got["on"]
        assert on["loss"] == pytest.approx(off["loss"], rel=1e-6)
        for name, g in off["grads"].items():
            err = float((on["grads"][name] - g).abs().max() / g.abs().max().clamp_min(1e-12))
            assert err < 1e-5, (rank, name, err)
        # the norms' and the column-parallel linears' inputs hold half the tokens: fewer
        # bytes saved, by what the planner models
        measured = on["saved"] / off["saved"]
        modelled = _planned_ratio(world, tp, cp, pattern)
        assert measured < 0.85, (on["saved"], off["saved"])
        assert abs(measured - modelled) <= 0.05, (measured, modelled)


def _planned_ratio(world: int, tp: int, cp: int, pattern: str) -> float:
    """The planner's saved bytes (layers and final) with sequence parallelism over without."""
    from longtrain.config.schema import RunConfig
    from longtrain.memory.estimate import Policy, Shape, activation_bytes

    out = []
    for sp in (True, False):
        cfg = RunConfig()
        cfg.model.vocab_size, cfg.model.num_layers, cfg.model.layer_pattern = VOCAB, 2, pattern
        cfg.attention.backend = "ring" if cp > 1 else "dense"
        cfg.parallel.world_size, cfg.parallel.tp, cfg.parallel.cp = world, tp, cp
        cfg.parallel.sequence_parallel = sp
        cfg.data.seq_len, cfg.data.micro_batch_size = T, 2
        got = activation_bytes(Shape.of(cfg), Policy())
        out.append(got["layers"] + got["final"])
    return out[0] / out[1]


def test_a_sequence_that_does_not_split_over_tp_is_named():
    from longtrain.config.schema import RunConfig
    from longtrain.planning.validate import problems

    cfg = RunConfig()
    cfg.parallel.world_size, cfg.parallel.tp, cfg.parallel.cp = 4, 2, 2
    cfg.model.num_heads, cfg.model.num_kv_heads = 4, 2
    cfg.data.seq_len = 36  # 18 local tokens per CP rank: 9 per TP rank... fine
    assert not any("sequence parallelism" in p for p in problems(cfg))
    cfg.data.seq_len = 20  # 10 per CP rank: 5 per TP rank
    cfg.parallel.tp, cfg.parallel.world_size = 4, 8
    found = [p for p in problems(cfg) if "sequence parallelism" in p]
    assert found and "data.seq_len=20 / parallel.cp=2 = 10 local tokens is not divisible by " \
                     "parallel.tp=4" in found[0], problems(cfg)
    cfg.parallel.sequence_parallel = False
    assert not any("sequence parallelism" in p for p in problems(cfg))
    cfg.parallel.sequence_parallel, cfg.optim.zero = True, 1
    assert any("parallel.sequence_parallel=true with optim.zero=1" in p for p in problems(cfg))
