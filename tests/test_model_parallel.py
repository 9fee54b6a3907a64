"""Tensor and data parallelism compute the single-process function.

Three spawned worlds (process start dominates the cost, so each does several things):

- world 1: TP=1 model runs; one training step at micro-batch 1 (the reference) and 2.
- world 2: TP=2 model runs; a TP=2 training step; then re-meshed as DP=2, a training step.
- world 4: TP=2 x DP=2 training steps (micro-batch 1 and 2); then re-meshed as DP=4.

Every rank runs the production code and saves what it gathered (full logits through
`gather_vocab_logits`, canonical weights and gradients through `canonical_state_dict`). The
tests compare each rank's results with a float64 plain-PyTorch Llama built from the canonical
weights (the oracle), and training layouts with the world-1 step.

Shape legend: B batch, T tokens, V vocabulary, D head dim.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator, Optional

import pytest
import torch
import torch.nn.functional as F

from conftest import ADAM_UPDATE_RTOL, FP32_RTOL, LAYOUT_RTOL, rel_err, worst
from longtrain.config.schema import (DataConfig, ModelConfig, OptimConfig, ParallelConfig,
                                     RopeConfig, RunConfig, TrainConfig)
from longtrain.model.rope import rope_inv_freq
from longtrain.parallel.spawn import run_distributed

IGNORE_INDEX = -100
SEED = 7

# name -> (model, rope, weights): "init" = init_weights(SEED); "random" = load_canonical of
# random weights with non-trivial norms and biases.
MODEL_CASES: dict[str, tuple[ModelConfig, RopeConfig, str]] = {
    # vocab 301 is odd: TP=2 pads it to 302 and masks the padded logit.
    "gqa_padded_vocab": (
        ModelConfig(vocab_size=301, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=4, num_kv_heads=2),
        RopeConfig(),
        "init",
    ),
    # head_dim 16 != hidden/heads = 12; tied head shares the padded embedding; YaRN scales cos/sin.
    "bias_tied_yarn": (
        ModelConfig(vocab_size=259, hidden_size=48, intermediate_size=80, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True,
                    tie_embeddings=True),
        RopeConfig(scaling="yarn", factor=4.0, original_max_position_embeddings=16),
        "random",
    ),
}

TRAIN_LAYOUTS = [  # (world fixture, layout name) compared with world 1 at micro-batch 1
    ("world1", "w1_mb2"),
    ("world2", "tp2"),
    ("world2", "dp2"),
    ("world4", "tp2xdp2"),
    ("world4", "tp2xdp2_mb2"),
    ("world4", "dp4"),
]


# ---------------------------------------------------------------- inputs and configs

def _inputs(cfg: ModelConfig) -> dict[str, tuple[torch.Tensor, ...]]:
    """kind -> (tokens_bt, labels_bt, positions_bt, doc_ids_bt or None); T = 23 on purpose."""
    gen = torch.Generator().manual_seed(SEED)
    b, t = 2, 23
    tokens = torch.randint(0, cfg.vocab_size, (b, t), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (b, t), generator=gen)
    labels[0, :3] = IGNORE_INDEX
    labels[1, 10] = IGNORE_INDEX
    positions = torch.arange(t).expand(b, t).contiguous()
    # Packed documents: attention stays inside a document, positions restart at each one.
    doc_ids = torch.tensor([[0] * 9 + [1] * 14, [0] * 5 + [1] * 10 + [2] * 8])
    starts = torch.zeros_like(doc_ids)
    for row in range(b):
        for j in range(1, t):
            same = bool(doc_ids[row, j] == doc_ids[row, j - 1])
            starts[row, j] = starts[row, j - 1] if same else j
    packed_positions = torch.arange(t).expand(b, t) - starts
    return {"causal": (tokens, labels, positions, None),
            "packed": (tokens, labels, packed_positions, doc_ids)}


def _random_canonical(shapes: dict[str, tuple[int, ...]], *, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        x = torch.randn(shapes[name], generator=gen)
        if name.endswith("norm.weight"):
            x = 1.0 + 0.2 * x
        elif name.endswith(".bias"):
            x = 0.1 * x
        else:
            x = 0.05 * x
        out[name] = x
    return out


def _train_config(*, world_size: int, tp: int, micro: int) -> RunConfig:
    # seq_len 192: the passkey task needs data.seq_len >= 189. vocab 259 (byte tokenizer) is odd.
    # No warmup and no clipping, so the step applies the full LR to the raw gradients.
    return RunConfig(
        model=ModelConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2),
        parallel=ParallelConfig(world_size=world_size, tp=tp),
        optim=OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=0.0),
        data=DataConfig(seq_len=192, batch_size=4, micro_batch_size=micro, seed=3),
        train=TrainConfig(steps=1, seed=SEED),
    )


def _mask_cut(tokens_t: torch.Tensor) -> int:
    """Targets before this position are ignored: a function of the sample alone, so every
    layout masks the same tokens while DP ranks see different target counts."""
    return int(tokens_t.sum()) % tokens_t.shape[0]


# ---------------------------------------------------------------- spawned side

def _remesh(rt: Any, *, tp: int) -> Any:
    """Rebuild megatron's groups over the same world with another TP degree (cp=1)."""
    from longtrain.parallel.dims import ParallelDims
    from longtrain.parallel.runtime import remesh

    return remesh(rt, ParallelDims(rt.dims.world_size, tp, 1))


def _model_runs(rt: Any) -> dict[str, Any]:
    from longtrain.attention.base import get_attention
    from longtrain.model.llama import LlamaModel
    from longtrain.model.sharding import (canonical_shapes, canonical_state_dict,
                                          gather_vocab_logits, init_weights, load_canonical)
    from longtrain.train.loss import token_loss_sum

    tp = rt.dims.tp
    out: dict[str, Any] = {}
    for name, (cfg, rope, weights) in MODEL_CASES.items():
        model = LlamaModel(cfg, rope, attention=get_attention("dense"), tp=tp, tp_rank=rt.tp_rank)
        loaded = None
        if weights == "init":
            init_weights(model, seed=SEED)
        else:
            loaded = _random_canonical(canonical_shapes(model), seed=SEED)
            load_canonical(model, loaded.__getitem__)
        case: dict[str, Any] = {"weights": canonical_state_dict(model, group=rt.tp_group),
                                "loaded": loaded}
        for kind, (tokens, labels, positions, doc_ids) in _inputs(cfg).items():
            model.zero_grad(set_to_none=True)
            logits = model(tokens, positions_bt=positions, doc_ids_bt=doc_ids)
            loss = token_loss_sum(logits, labels)
            loss.backward()
            case[kind] = {
                "logits": gather_vocab_logits(logits.detach(), vocab_size=cfg.vocab_size, tp=tp,
                                              group=rt.tp_group),
                "loss": loss.detach(),
                "local_last_column_masked": bool(torch.isneginf(logits[..., -1]).all()),
                "grads": canonical_state_dict(model, group=rt.tp_group, grads=True),
            }
        out[name] = case
    return out


def _train_run(rt: Any, *, micro: int) -> dict[str, Any]:
    """One step of the production loop on masked passkey data; canonical results."""
    from longtrain.planning.validate import validate
    from longtrain.data import loader
    from longtrain.model.sharding import canonical_state_dict
    from longtrain.train import loop
    from longtrain.train.optim import Optimizer

    cfg = _train_config(world_size=rt.dims.world_size, tp=rt.dims.tp, micro=micro)
    validate(cfg)
    local_targets: list[int] = []

    def masked_iterate(*args: Any, **kwargs: Any) -> Iterator[list[Any]]:
        for micro_batches in loader.iterate(*args, **kwargs):
            for mb in micro_batches:
                # A new tensor: at cp=1 the loader's labels may be a view of the tokens.
                t = mb.labels_bt.shape[1]
                cuts = torch.tensor([_mask_cut(row) for row in mb.tokens_bt])
                keep = torch.arange(t)[None, :] >= cuts[:, None]
                mb.labels_bt = torch.where(keep, mb.labels_bt, IGNORE_INDEX)
            local_targets.append(sum(mb.num_targets for mb in micro_batches))
            yield micro_batches

    model = loop.build_model(cfg, rt)
    initial = canonical_state_dict(model, group=rt.tp_group)
    state = loop.TrainState(model, Optimizer(model, cfg.optim, total_steps=cfg.train.steps), rt)
    original, loop.iterate = loop.iterate, masked_iterate
    try:
        metrics = next(loop.train(cfg, rt, state=state))
    finally:
        loop.iterate = original
    return {
        "loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "lr": metrics["lr"],
        "local_targets": local_targets[0], "dp_rank": rt.dp_rank, "initial": initial,
        "params": canonical_state_dict(model, group=rt.tp_group),
        "grads": canonical_state_dict(model, group=rt.tp_group, grads=True),
    }


def _save(rt: Any, out_dir: str, result: dict[str, Any]) -> None:
    torch.save(result, os.path.join(out_dir, f"rank{rt.rank}.pt"))


def _world1(rt: Any, out_dir: str) -> None:
    _save(rt, out_dir, {"model": _model_runs(rt),
                        "train": {"w1_mb1": _train_run(rt, micro=1),
                                  "w1_mb2": _train_run(rt, micro=2)}})


def _world2(rt: Any, out_dir: str) -> None:
    model = _model_runs(rt)
    train = {"tp2": _train_run(rt, micro=1)}
    rt = _remesh(rt, tp=1)
    train["dp2"] = _train_run(rt, micro=1)
    _save(rt, out_dir, {"model": model, "train": train})


def _world4(rt: Any, out_dir: str) -> None:
    train = {"tp2xdp2": _train_run(rt, micro=1), "tp2xdp2_mb2": _train_run(rt, micro=2)}
    rt = _remesh(rt, tp=1)
    train["dp4"] = _train_run(rt, micro=1)
    _save(rt, out_dir, {"train": train})


def _spawn(fn: Any, tmp_path_factory: pytest.TempPathFactory, *, world_size: int,
           tp: int) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp(fn.__name__.strip("_"))
    run_distributed(fn, world_size=world_size, tp=tp, args=(str(out_dir),))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.fixture(scope="module")
def world1(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _spawn(_world1, tmp_path_factory, world_size=1, tp=1)


@pytest.fixture(scope="module")
def world2(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _spawn(_world2, tmp_path_factory, world_size=2, tp=2)


@pytest.fixture(scope="module")
def world4(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _spawn(_world4, tmp_path_factory, world_size=4, tp=2)


# ---------------------------------------------------------------- the oracle

def _oracle(sd: dict[str, torch.Tensor], cfg: ModelConfig, rope: RopeConfig,
            tokens_bt: torch.Tensor, labels_bt: torch.Tensor, positions_bt: torch.Tensor,
            doc_ids_bt: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor,
                                                          dict[str, torch.Tensor]]:
    """Plain float64 Llama from canonical (Hugging Face) weights: logits [B, T, V], the summed
    token loss, and its gradient for every canonical weight."""
    w = {k: v.detach().double().requires_grad_(True) for k, v in sd.items()}
    b, t = tokens_bt.shape
    hq, hkv = cfg.num_heads, cfg.num_kv_heads
    d = cfg.head_dim or cfg.hidden_size // hq
    inv_freq, scale = rope_inv_freq(rope, head_dim=d,
                                    max_position_embeddings=cfg.max_position_embeddings)
    angle_btf = positions_bt.double()[..., None] * inv_freq.double()
    cos_b1td = torch.cat([angle_btf, angle_btf], -1).cos()[:, None] * scale
    sin_b1td = torch.cat([angle_btf, angle_btf], -1).sin()[:, None] * scale
    allowed_btt = torch.ones(t, t, dtype=torch.bool).tril().expand(b, t, t)
    if doc_ids_bt is not None:
        allowed_btt = allowed_btt & (doc_ids_bt[:, :, None] == doc_ids_bt[:, None, :])

    def rotate(x_bhtd: torch.Tensor) -> torch.Tensor:
        x1, x2 = x_bhtd.chunk(2, dim=-1)
        return x_bhtd * cos_b1td + torch.cat([-x2, x1], dim=-1) * sin_b1td

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return w[name] * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)

    def proj(x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ w[f"{name}.weight"].T
        return y + w[f"{name}.bias"] if f"{name}.bias" in w else y

    def heads(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(b, t, n, d).transpose(1, 2)

    x = w["model.embed_tokens.weight"][tokens_bt]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        h = norm(x, f"{p}.input_layernorm.weight")
        q = rotate(heads(proj(h, f"{p}.self_attn.q_proj"), hq))
        k = rotate(heads(proj(h, f"{p}.self_attn.k_proj"), hkv)).repeat_interleave(hq // hkv, 1)
        v = heads(proj(h, f"{p}.self_attn.v_proj"), hkv).repeat_interleave(hq // hkv, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~allowed_btt[:, None], float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, hq * d)
        x = x + proj(o, f"{p}.self_attn.o_proj")
        h = norm(x, f"{p}.post_attention_layernorm.weight")
        gated = F.silu(proj(h, f"{p}.mlp.gate_proj")) * proj(h, f"{p}.mlp.up_proj")
        x = x + proj(gated, f"{p}.mlp.down_proj")
    head = w["model.embed_tokens.weight"] if cfg.tie_embeddings else w["lm_head.weight"]
    logits = norm(x, "model.norm.weight") @ head.T
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels_bt.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    grads = torch.autograd.grad(loss, list(w.values()))
    return logits.detach(), loss.detach(), dict(zip(w, grads))


# ---------------------------------------------------------------- tests: model

@pytest.mark.parametrize("case", sorted(MODEL_CASES))
@pytest.mark.parametrize("world", ["world1", "world2"])
def test_logits_and_every_gradient_match_float64_oracle(world: str, case: str,
                                                        request: pytest.FixtureRequest) -> None:
    ranks = request.getfixturevalue(world)
    cfg, rope, _ = MODEL_CASES[case]
    for rank, result in enumerate(ranks):
        runs = result["model"][case]
        for kind, inputs in _inputs(cfg).items():
            logits, loss, grads = _oracle(runs["weights"], cfg, rope, *inputs)
            got = runs[kind]
            errors = {"logits": rel_err(got["logits"], logits), "loss": rel_err(got["loss"], loss)}
            assert set(got["grads"]) == set(grads)
            errors.update({f"grad {n}": rel_err(got["grads"][n], g) for n, g in grads.items()})
            name, err = worst(errors)
            assert err <= FP32_RTOL, f"{world} rank {rank} {kind}: {name} rel err {err:.2e}"
            # The oracle must see something: masked targets are excluded, the rest count.
            assert float(loss) > 0 and float(grads["model.embed_tokens.weight"].abs().max()) > 0


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_padded_vocab_logit_is_masked_and_dropped(case: str, world1: list[dict[str, Any]],
                                                  world2: list[dict[str, Any]]) -> None:
    # Both vocabularies are odd: TP=2 pads one row, which lands on the last TP rank.
    cfg = MODEL_CASES[case][0]
    assert cfg.vocab_size % 2 == 1
    masked = [r["model"][case]["causal"]["local_last_column_masked"] for r in world2]
    assert masked == [False, True]
    assert world1[0]["model"][case]["causal"]["local_last_column_masked"] is False
    for result in [*world1, *world2]:
        logits = result["model"][case]["causal"]["logits"]
        assert logits.shape[-1] == cfg.vocab_size and torch.isfinite(logits).all()


def test_weights_are_the_same_function_at_every_tp(world1: list[dict[str, Any]],
                                                   world2: list[dict[str, Any]]) -> None:
    # Seeded init depends only on canonical names, never on the TP layout.
    ref = world1[0]["model"]["gqa_padded_vocab"]["weights"]
    for result in world2:
        got = result["model"]["gqa_padded_vocab"]["weights"]
        assert set(got) == set(ref)
        for name in ref:
            assert torch.equal(got[name], ref[name]), name
    # load_canonical then canonical_state_dict round-trips exactly at TP=1 and TP=2.
    for result in [*world1, *world2]:
        runs = result["model"]["bias_tied_yarn"]
        assert set(runs["weights"]) == set(runs["loaded"])
        assert "lm_head.weight" not in runs["weights"]
        for name, tensor in runs["loaded"].items():
            assert torch.equal(runs["weights"][name], tensor), name


# ---------------------------------------------------------------- tests: training step

def _compare_step(got: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    errors = {
        "loss": abs(got["loss"] - ref["loss"]) / abs(ref["loss"]),
        "grad_norm": abs(got["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"],
        "lr": abs(got["lr"] - ref["lr"]) / ref["lr"],
    }
    assert set(got["grads"]) == set(ref["grads"]) == set(got["params"])
    errors.update({f"grad {n}": rel_err(got["grads"][n], g) for n, g in ref["grads"].items()})
    return errors


@pytest.mark.parametrize("world,layout", TRAIN_LAYOUTS)
def test_train_step_matches_world1(world: str, layout: str, world1: list[dict[str, Any]],
                                   request: pytest.FixtureRequest) -> None:
    ref = world1[0]["train"]["w1_mb1"]
    ranks = [r["train"][layout] for r in request.getfixturevalue(world)]
    for rank, got in enumerate(ranks):
        errors = _compare_step(got, ref)
        name, err = worst(errors)
        assert err <= LAYOUT_RTOL, f"{layout} rank {rank}: {name} rel err {err:.2e}"
        for n, p in ref["initial"].items():
            assert torch.equal(got["initial"][n], p), f"{layout} rank {rank}: initial {n}"
        # The update, not the weight: the first AdamW step moves weights by ~lr, far below
        # their size, so comparing weights would hide a wrong update.
        updates = {n: rel_err(got["params"][n] - ref["initial"][n], p - ref["initial"][n])
                   for n, p in ref["params"].items()}
        name, err = worst(updates)
        assert err <= ADAM_UPDATE_RTOL, f"{layout} rank {rank}: update of {name} rel err {err:.2e}"
    # Data-parallel replicas leave the step bit-identical, or they would drift apart.
    for rank, got in enumerate(ranks[1:], start=1):
        for n, p in ranks[0]["params"].items():
            assert torch.equal(got["params"][n], p), f"{layout} rank {rank} vs 0: {n}"
    # Every layout saw the same global number of targets (counted once per DP rank).
    per_dp = {got["dp_rank"]: got["local_targets"] for got in ranks}
    assert sum(per_dp.values()) == sum(r["train"]["w1_mb1"]["local_targets"] for r in world1)


def test_train_step_is_a_real_step(world1: list[dict[str, Any]],
                                   world2: list[dict[str, Any]]) -> None:
    """Guards the layout comparison against passing vacuously."""
    ref = world1[0]["train"]["w1_mb1"]
    cfg = _train_config(world_size=1, tp=1, micro=1)
    assert 0 < ref["loss"] < 2 * math.log(cfg.model.vocab_size)
    assert ref["grad_norm"] > 0
    moved = max(float((ref["params"][n] - p).abs().max()) for n, p in ref["initial"].items())
    # AdamW's first step moves a weight by about lr.
    assert 0.5 * cfg.optim.lr < moved < 1.5 * cfg.optim.lr
    # The masked data gives the DP ranks different target counts, so normalizing per rank
    # instead of by the global count would change the loss and the gradients.
    per_dp = {r["train"]["dp2"]["dp_rank"]: r["train"]["dp2"]["local_targets"] for r in world2}
    assert len(per_dp) == 2 and per_dp[0] != per_dp[1]
    assert sum(per_dp.values()) < cfg.data.batch_size * cfg.data.seq_len
