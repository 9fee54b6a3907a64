"""Entropy-ABF (`rope.scaling="entropy_abf"`): the query scale against its formula, the model
against ABF with hand-scaled queries, context parallelism against CP=1, and the Hugging Face
export round trip.

One spawned world of 2 (CP=2) runs every model check: process start dominates the cost.
Shape legend: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
from typing import TYPE_CHECKING, Any, Optional

import pytest
import torch

from conftest import LAYOUT_RTOL, rel_err, worst
from longtrain.attention.base import AttentionContext, AttentionFn, AttentionMeta, get_attention
from longtrain.config.schema import ModelConfig, RopeConfig
from longtrain.model.rope import query_scale, rope_from_hf, rope_to_hf

if TYPE_CHECKING:
    from longtrain.model.llama import LlamaModel

# The checkpoint's training length; the test sequences run past it.
L_TRAIN = 8
MODEL = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=64)
ENTROPY = RopeConfig(scaling="entropy_abf", theta=500000.0, original_max_position_embeddings=L_TRAIN)
ABF = dataclasses.replace(ENTROPY, scaling="abf")
SEED = 5
# Tolerances live here (and in conftest). float32 log against the float64 formula.
SCALE_RTOL = 1e-6
# Visibly different (observed ~3e-2 at layer 2, ~6e-2 in the logits): the query scale reaches
# log(32)/log(8) = 1.67 at the end of the sequence.
MIN_EFFECT = 1e-2


def _formula(positions_bt: torch.Tensor, original: int) -> torch.Tensor:
    return torch.tensor([[max(1.0, math.log(p + 1) / math.log(original)) for p in row]
                         for row in positions_bt.tolist()], dtype=torch.float64)


def test_query_scale_matches_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    for original, max_pos in ((L_TRAIN, 64), (4096, 131072), (None, 2048)):
        rope = dataclasses.replace(ENTROPY, original_max_position_embeddings=original)
        resolved = original or max_pos
        positions_bt = torch.randint(0, 4 * resolved, (3, 50), generator=gen)
        # Both sides of the boundary, exactly.
        positions_bt[0, :4] = torch.tensor([0, resolved - 2, resolved - 1, resolved])
        scale_bt = query_scale(rope, positions_bt, max_position_embeddings=max_pos)
        assert scale_bt is not None and scale_bt.dtype == torch.float32
        assert scale_bt.shape == positions_bt.shape
        torch.testing.assert_close(scale_bt.double(), _formula(positions_bt, resolved),
                                   rtol=SCALE_RTOL, atol=0)
        inside = positions_bt < resolved
        assert bool((scale_bt[inside] == 1.0).all()) and bool((scale_bt[~inside] > 1.0).all())
    for other in (ABF, RopeConfig(), RopeConfig(scaling="yarn", factor=2.0)):
        assert query_scale(other, positions_bt, max_position_embeddings=64) is None


@pytest.mark.parametrize(("rope", "field"), [
    (dataclasses.replace(ENTROPY, original_max_position_embeddings=1),
     "rope.original_max_position_embeddings"),
    (dataclasses.replace(ENTROPY, entropy_unscaled_layers=-1), "rope.entropy_unscaled_layers"),
])
def test_bad_entropy_config_names_the_field(rope: RopeConfig, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        query_scale(rope, torch.zeros(1, 1, dtype=torch.int64), max_position_embeddings=64)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        rope_to_hf(rope, max_position_embeddings=64)


def test_preset_sets_the_larger_base() -> None:
    from hydra import compose, initialize_config_module

    from longtrain_launch.store import register_configs, to_run_config

    register_configs()
    with initialize_config_module(config_module="longtrain_conf", version_base="1.3"):
        cfg = to_run_config(compose(config_name="config",
                                    overrides=["output_dir=/tmp/unused", "rope=entropy_abf"]))
    assert (cfg.rope.scaling, cfg.rope.theta, cfg.rope.entropy_unscaled_layers) == (
        "entropy_abf", 500000.0, 2)


# ---------------------------------------------------------------- spawned side

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


def _inputs(t: int) -> dict[str, Inputs]:
    """kind -> (tokens_bt, labels_bt, positions_bt, doc_ids_bt or None)."""
    gen = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, MODEL.vocab_size, (2, t), generator=gen)
    labels = torch.randint(0, MODEL.vocab_size, (2, t), generator=gen)
    positions = torch.arange(t).expand(2, t).contiguous()
    # Packed documents: positions restart, so some documents stay inside L_TRAIN.
    cut = [t // 4 + 1, t - 5]
    doc_ids = torch.stack([(torch.arange(t) >= c).long() for c in cut])
    packed = torch.stack([torch.where(torch.arange(t) >= c, torch.arange(t) - c, torch.arange(t))
                          for c in cut])
    return {"causal": (tokens, labels, positions, None), "packed": (tokens, labels, packed, doc_ids)}


def _model(rope: RopeConfig, attention: Any) -> LlamaModel:
    from longtrain.model.llama import LlamaModel
    from longtrain.model.sharding import canonical_shapes, load_canonical

    model = LlamaModel(MODEL, rope, attention=attention, tp=1, tp_rank=0)
    # Larger than init_std, so attention is far from uniform and the query scale shows.
    gen = torch.Generator().manual_seed(SEED)
    weights = {name: (1.0 + 0.2 * torch.randn(shape, generator=gen) if name.endswith("norm.weight")
                      else 0.1 * torch.randn(shape, generator=gen))
               for name, shape in sorted(canonical_shapes(model).items())}
    load_canonical(model, weights.__getitem__)
    return model


def _run(model: LlamaModel, tokens: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
         doc_ids: Optional[torch.Tensor], *, ctx: Optional[AttentionContext] = None
         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and every parameter's gradient of the summed token loss."""
    from longtrain.train.loss import token_loss_sum

    model.zero_grad(set_to_none=True)
    logits = model(tokens, positions_bt=positions, doc_ids_bt=doc_ids, ctx=ctx or AttentionContext())
    token_loss_sum(logits, labels).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _hand_scaled_attention(scale_bt: torch.Tensor, unscaled: int) -> AttentionFn:
    """Dense attention that scales the queries itself, by the formula, in layers >= unscaled
    (layers call it in order, once each per forward)."""
    dense = get_attention("dense")
    calls = itertools.count()

    def attention(q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor,
                  meta: AttentionMeta, ctx: AttentionContext) -> torch.Tensor:
        if next(calls) % MODEL.num_layers >= unscaled:
            q_bthd = (q_bthd.float() * scale_bt[:, :, None, None]).to(q_bthd.dtype)
        return dense(q_bthd, k_bthd, v_bthd, meta, ctx)

    return attention


def _check_against_abf() -> None:
    dense = get_attention("dense")
    for kind, (tokens, labels, positions, doc_ids) in _inputs(32).items():
        scale_bt = _formula(positions, L_TRAIN).float()
        for unscaled in (2, 0):
            rope = dataclasses.replace(ENTROPY, entropy_unscaled_layers=unscaled)
            logits, grads = _run(_model(rope, dense), tokens, labels, positions, doc_ids)
            ref_logits, ref_grads = _run(_model(ABF, _hand_scaled_attention(scale_bt, unscaled)),
                                         tokens, labels, positions, doc_ids)
            errors = {"logits": rel_err(logits, ref_logits)}
            errors.update({f"grad {n}": rel_err(g, ref_grads[n]) for n, g in grads.items()})
            name, err = worst(errors)
            assert err <= LAYOUT_RTOL, f"{kind} unscaled={unscaled}: {name} rel err {err:.2e}"

        # The first two layers are exactly ABF's; the scaled third one is not.
        outputs: dict[str, list[torch.Tensor]] = {}
        final: dict[str, torch.Tensor] = {}
        for name, rope in (("entropy", ENTROPY), ("abf", ABF)):
            model = _model(rope, dense)
            outputs[name] = []
            for layer in model.layers:
                layer.register_forward_hook(lambda _m, _i, out, acc=outputs[name]: acc.append(out))
            with torch.no_grad():
                final[name] = model(tokens, positions_bt=positions, doc_ids_bt=doc_ids)
        for i in (0, 1):
            assert torch.equal(outputs["entropy"][i], outputs["abf"][i]), (kind, i)
        assert rel_err(outputs["entropy"][2], outputs["abf"][2]) > MIN_EFFECT, kind
        assert rel_err(final["entropy"], final["abf"]) > MIN_EFFECT, kind

    # Inside the training length Entropy-ABF is ABF, exactly.
    for kind, (tokens, labels, positions, doc_ids) in _inputs(L_TRAIN).items():
        logits, grads = _run(_model(ENTROPY, dense), tokens, labels, positions, doc_ids)
        ref_logits, ref_grads = _run(_model(ABF, dense), tokens, labels, positions, doc_ids)
        assert torch.equal(logits, ref_logits), kind
        assert all(torch.equal(g, ref_grads[n]) for n, g in grads.items()), kind


def _check_cp_matches_cp1(rt: Any) -> None:
    import torch.distributed as dist

    from longtrain.parallel.layout import split_for_cp
    from longtrain.train.loop import attention_context

    cp, cp_rank = rt.dims.cp, rt.cp_rank
    ctx = attention_context(rt)
    for kind, inputs in _inputs(32).items():
        ref_logits, ref_grads = _run(_model(ENTROPY, get_attention("dense")), *inputs)
        shards = [None if x is None else split_for_cp(x, cp_size=cp, cp_rank=cp_rank) for x in inputs]
        for backend in ("ring", "ulysses"):
            logits, grads = _run(_model(ENTROPY, get_attention(backend)), *shards, ctx=ctx)
            for g in grads.values():
                dist.all_reduce(g, group=rt.cp_group)
            errors = {"logits": rel_err(logits, split_for_cp(ref_logits, cp_size=cp, cp_rank=cp_rank))}
            errors.update({f"grad {n}": rel_err(g, ref_grads[n]) for n, g in grads.items()})
            name, err = worst(errors)
            assert err <= LAYOUT_RTOL, (
                f"{backend} cp={cp} rank {cp_rank} {kind}: {name} rel err {err:.2e}")


def _world(rt: Any) -> None:
    if rt.rank == 0:
        _check_against_abf()
    _check_cp_matches_cp1(rt)


def test_model_against_abf_and_under_context_parallelism() -> None:
    from longtrain.parallel.spawn import run_distributed

    run_distributed(_world, world_size=2, cp=2)


# ---------------------------------------------------------------- Hugging Face export

class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_hf_export_round_trip(tmp_path: Any) -> None:
    from longtrain.checkpoint.hf import export_hf, read_hf_config
    from longtrain.observability.log import get_logger

    # Construction, init and a TP=1 export need no process group.
    model = _model(ENTROPY, get_attention("dense"))
    out = tmp_path / "entropy"
    records = _Records()
    get_logger().addHandler(records)
    try:
        export_hf(model, ENTROPY, str(out))
    finally:
        get_logger().removeHandler(records)
    warned = [m for m in records.messages if "transformers does not scale attention queries" in m]
    assert len(warned) == 1, records.messages

    raw = json.loads((out / "config.json").read_text())
    assert raw["rope_theta"] == 500000.0 and raw["rope_scaling"] is None
    assert raw["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    assert raw["longtrain_rope"] == {"scaling": "entropy_abf", "theta": 500000.0,
                                     "original_max_position_embeddings": L_TRAIN,
                                     "entropy_unscaled_layers": 2}
    assert read_hf_config(str(out)) == (dataclasses.replace(MODEL, name="entropy"), ENTROPY)
    # An unset original length is exported resolved.
    unset = dataclasses.replace(ENTROPY, original_max_position_embeddings=None)
    assert rope_from_hf({"max_position_embeddings": 64, **rope_to_hf(unset, max_position_embeddings=64)}
                        ) == dataclasses.replace(unset, original_max_position_embeddings=64)

    # transformers reads the file (our extra key is ignored) as plain RoPE with the larger base.
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.AutoConfig.from_pretrained(str(out))
    assert hf_config.rope_parameters["rope_theta"] == 500000.0
    assert hf_config.rope_parameters["rope_type"] == "default"


def test_hf_config_edited_apart_from_ours_is_refused(tmp_path: Any) -> None:
    from longtrain.checkpoint.hf import hf_config_dict, read_hf_config

    raw = hf_config_dict(MODEL, ENTROPY, dtype=torch.float32)
    raw["rope_theta"] = raw["rope_parameters"]["rope_theta"] = 10000.0
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="longtrain_rope") as info:
        read_hf_config(str(tmp_path))
    assert os.path.join(str(tmp_path), "config.json") in str(info.value)


def test_apply_init_from_takes_the_user_theta(tmp_path: Any) -> None:
    from longtrain.checkpoint.hf import export_hf
    from longtrain.planning.resolve import apply_init_from
    from longtrain.config.schema import RunConfig

    # The checkpoint: plain RoPE trained at MODEL.max_position_embeddings.
    plain = RopeConfig()
    export_hf(_model(plain, get_attention("dense")), plain, str(tmp_path / "ckpt"))
    base = RunConfig(init={"from": str(tmp_path / "ckpt")})
    user = RopeConfig(scaling="entropy_abf", theta=2e6)
    merged = apply_init_from(dataclasses.replace(base, rope=user))
    assert merged.rope == dataclasses.replace(
        user, original_max_position_embeddings=MODEL.max_position_embeddings)
