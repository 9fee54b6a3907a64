"""Model state sharded over CP x DP (optim.zero = 1, 2: DeepSpeed; 3: FSDP2) and Megatron
sequence parallelism: 20-step loss curves equal the plain run's, at TP2 x CP2, TP2 x DP2 and
CP2 x DP2, also after a save in one layout and sharding level and a resume in another.

Three spawned worlds of four ranks, run in order (each resumes from the one before):

- A (TP2 x CP2, two micro-batches per rank): plain, SP, FSDP, FSDP + SP; the FSDP + SP run saves at step 10.
- B (TP2 x DP2): plain, SP, FSDP, FSDP + SP, ZeRO-2 (saves at step 10); A's checkpoint
  resumed with FSDP + SP and with ZeRO-2.
- C (CP2 x DP2): plain, FSDP, FSDP with every layer recomputed, ZeRO-1, bf16 plain and bf16
  FSDP;
  A's checkpoint resumed by the plain optimizer, B's ZeRO-2 one with FSDP.

Each rank also reports the bytes of parameters, gradients and optimizer state it holds.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import pytest
import torch

from conftest import BF16_LAYOUT_RTOL, LAYOUT_RTOL
from longtrain.parallel.spawn import run_distributed

STEPS, SAVE_AT = 20, 10
# the loss of every step (the bound: 1e-5 relative); the clipped gradient norm, a
# sum of squares over every parameter, moves ten times more with the order of reductions
NORM_RTOL = 10 * LAYOUT_RTOL


def _config(rt: Any, out: str, *, zero: int, sp: Optional[bool], precision: str,
            save_dir: str, resume: str, checkpointing: str = "none"):
    from longtrain.config.schema import RunConfig

    cfg = RunConfig()
    d = rt.dims
    cfg.parallel.world_size, cfg.parallel.tp, cfg.parallel.cp = d.world_size, d.tp, d.cp
    cfg.parallel.sequence_parallel = sp
    cfg.attention.backend = "ring" if d.cp > 1 else "dense"
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.intermediate_size = 2, 64, 160
    cfg.model.num_heads, cfg.model.num_kv_heads = 4, 2
    cfg.model.vocab_size = 301  # odd: padded under TP, so the head's chunks are uneven
    cfg.data.seq_len, cfg.data.docs_per_seq = 192, 1
    # the same global batch in every layout: two micro-batches per rank at DP = 1
    cfg.data.batch_size, cfg.data.micro_batch_size = 2, 1
    cfg.train.steps, cfg.train.precision = STEPS, precision
    cfg.memory.checkpointing = checkpointing
    cfg.optim.warmup_steps, cfg.optim.lr, cfg.optim.zero = 2, 3e-3, zero
    cfg.optim.grad_clip = 0.5  # active: the global norm of the shards must be right too
    cfg.output_dir = out
    cfg.checkpoint.dir = save_dir or os.path.join(out, "unused")
    cfg.checkpoint.resume = resume
    cfg.checkpoint.every, cfg.checkpoint.save_final = (SAVE_AT if save_dir else 0), False
    return cfg


def _held_bytes(state: Any) -> list[int]:
    """Bytes of the parameters this rank holds, and of its optimizer state (AdamW moments,
    and fp32 masters where they are not the parameters themselves)."""
    from longtrain.checkpoint.chunks import held_parts

    def storages(holders: list[Any]) -> dict[tuple[int, int], int]:
        # by address and size: DeepSpeed's parameters are views into one flat buffer
        return {(t.data_ptr(), t.nbytes): t.nbytes
                for held in holders for _, t in held_parts(held)}

    held = state.optimizer.held_state()
    params = storages([p.detach() for p in state.model.parameters()])
    optimizer = storages([h[k] for h in held for k in ("exp_avg", "exp_avg_sq", "master")])
    return [sum(params.values()),
            sum(n for ptr, n in optimizer.items() if ptr not in params)]


def _world(rt: Any, runs: list[dict[str, Any]], out: str) -> None:
    """Train each run in turn; rank 0 saves {name: {step: (loss, grad_norm)}} and each
    rank's held bytes."""
    from longtrain.train.loop import TrainState, train

    curves: dict[str, Any] = {}
    for run in runs:
        cfg = _config(rt, os.path.join(out, run["name"]), zero=run.get("zero", 0),
                      sp=run.get("sp", False),
                      precision=run.get("precision", "fp32"), save_dir=run.get("save", ""),
                      resume=run.get("resume", "never"),
                      checkpointing=run.get("checkpointing", "none"))
        state = TrainState.create(cfg, rt)
        curve = {m["step"]: (m["loss"], m["grad_norm"]) for m in train(cfg, rt, state=state)}
        held = torch.tensor(_held_bytes(state), dtype=torch.float64)
        everyone = [torch.zeros_like(held) for _ in range(rt.dims.world_size)]
        torch.distributed.all_gather(everyone, held)
        curves[run["name"]] = {"curve": curve, "held": [e.tolist() for e in everyone],
                               "resumed_from": state.resumed_from}
    if rt.rank == 0:
        torch.save(curves, os.path.join(out, "curves.pt"))


def _spawn(out: str, runs: list[dict[str, Any]], *, tp: int, cp: int) -> dict[str, Any]:
    run_distributed(_world, world_size=4, tp=tp, cp=cp, args=(runs, out), timeout_s=600)
    return torch.load(os.path.join(out, "curves.pt"), weights_only=False)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sharding")
    ckpt_a, ckpt_b = str(root / "ckpt_a"), str(root / "ckpt_b")
    step = f"step_{SAVE_AT:08d}"
    a = _spawn(str(root), [
        {"name": "plain"}, {"name": "sp", "sp": True}, {"name": "fsdp", "zero": 3},
        {"name": "fsdp+sp", "zero": 3, "sp": True, "save": ckpt_a}], tp=2, cp=2)
    b = _spawn(str(root), [
        {"name": "plain"}, {"name": "sp", "sp": True}, {"name": "fsdp", "zero": 3},
        {"name": "fsdp+sp", "zero": 3, "sp": True}, {"name": "zero2", "zero": 2, "save": ckpt_b},
        {"name": "A-fsdp+sp -> fsdp+sp", "zero": 3, "sp": True,
         "resume": os.path.join(ckpt_a, step)},
        {"name": "A-fsdp+sp -> zero2", "zero": 2, "resume": os.path.join(ckpt_a, step)}],
        tp=2, cp=1)
    c = _spawn(str(root), [
        {"name": "plain"}, {"name": "fsdp", "zero": 3},
        {"name": "fsdp, full recompute", "zero": 3, "checkpointing": "full"},
        {"name": "zero1", "zero": 1},
        {"name": "bf16 plain", "precision": "bf16"},
        {"name": "bf16 fsdp", "zero": 3, "precision": "bf16"},
        {"name": "A-fsdp+sp -> plain", "resume": os.path.join(ckpt_a, step)},
        {"name": "B-zero2 -> fsdp", "zero": 3,
         "resume": os.path.join(ckpt_b, step)}], tp=1, cp=2)
    return {"TP2xCP2": a, "TP2xDP2": b, "CP2xDP2": c}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _check(curve: dict[int, tuple[float, float]], plain: dict[int, tuple[float, float]], *,
           rtol: float = LAYOUT_RTOL, norm_rtol: float = NORM_RTOL) -> None:
    assert curve and set(curve) <= set(plain)
    for step, (loss, norm) in curve.items():
        loss0, norm0 = plain[step]
        assert _rel(loss, loss0) <= rtol, (step, loss, loss0)
        assert _rel(norm, norm0) <= norm_rtol, (step, norm, norm0)


@pytest.mark.parametrize("layout", ["TP2xCP2", "TP2xDP2", "CP2xDP2"])
def test_sharded_and_sequence_parallel_curves_match_the_plain_run(worlds, layout) -> None:
    runs = worlds[layout]
    plain = runs["plain"]["curve"]
    assert sorted(plain) == list(range(1, STEPS + 1))
    # the curve moves (a learning run, not a flat line) and clipping is active
    assert plain[STEPS][0] < plain[1][0] - 0.1 and plain[1][1] > 0.5
    fresh = [n for n in runs if "->" not in n and n != "plain" and not n.startswith("bf16")]
    assert fresh
    for name in fresh:
        assert sorted(runs[name]["curve"]) == list(range(1, STEPS + 1)), name
        _check(runs[name]["curve"], plain)


def test_bf16_full_sharding_follows_the_bf16_plain_run(worlds) -> None:
    runs = worlds["CP2xDP2"]
    _check(runs["bf16 fsdp"]["curve"], runs["bf16 plain"]["curve"], rtol=BF16_LAYOUT_RTOL,
           norm_rtol=10 * BF16_LAYOUT_RTOL)


@pytest.mark.parametrize("layout,name", [
    ("TP2xDP2", "A-fsdp+sp -> fsdp+sp"), ("TP2xDP2", "A-fsdp+sp -> zero2"),
    ("CP2xDP2", "A-fsdp+sp -> plain"), ("CP2xDP2", "B-zero2 -> fsdp")])
def test_resume_across_layouts_and_sharding_levels_continues_the_curve(worlds, layout,
                                                                        name) -> None:
    runs = worlds[layout]
    assert runs[name]["resumed_from"] and runs[name]["resumed_from"].endswith(
        f"step_{SAVE_AT:08d}")
    assert sorted(runs[name]["curve"]) == list(range(SAVE_AT + 1, STEPS + 1))
    _check(runs[name]["curve"], runs["plain"]["curve"])


def _planned(tp: int, cp: int, zero: int) -> tuple[float, float]:
    """The planner's parameter and optimizer-state bytes per rank for a world of this file."""
    from types import SimpleNamespace

    from longtrain.memory.estimate import Shape, static_bytes
    from longtrain.parallel.dims import ParallelDims

    rt = SimpleNamespace(dims=ParallelDims(world_size=4, tp=tp, cp=cp))
    cfg = _config(rt, "", zero=zero, sp=False, precision="fp32", save_dir="", resume="never")
    parts = static_bytes(Shape.of(cfg), zero=zero, shards=4 // tp)
    return parts["params"], parts["optimizer"]


@pytest.mark.parametrize("layout,tp,cp,runs", [
    ("CP2xDP2", 1, 2, {"plain": 0, "fsdp": 3, "zero1": 1}),
    ("TP2xDP2", 2, 1, {"plain": 0, "fsdp": 3, "zero2": 2})])
def test_sharded_model_state_per_rank_is_what_the_planner_counts(worlds, layout, tp, cp,
                                                                 runs) -> None:
    """Over CP x DP = N ranks each FSDP rank holds 1/N of the parameters and optimizer state
    of a plain rank, ZeRO-1/2 1/N of the optimizer state (its moments and its own fp32
    master partition); every rank's bytes are within 5% of the planner's (uneven shards and
    DeepSpeed's alignment padding)."""
    got = worlds[layout]
    n = 4 // tp
    (p0, o0) = got["plain"]["held"][0]
    for name, zero in runs.items():
        for params, optimizer in got[name]["held"]:
            plan_p, plan_o = _planned(tp, cp, zero)
            assert abs(params / plan_p - 1) < 0.05, (name, params, plan_p)
            assert abs(optimizer / plan_o - 1) < 0.05, (name, optimizer, plan_o)
        params, optimizer = got[name]["held"][0]
        if zero == 3:
            assert abs(params * n / p0 - 1) < 0.05 and abs(optimizer * n / o0 - 1) < 0.05
        elif zero:
            # the moments and a master partition: 12 / N bytes per parameter against 8
            assert params == p0 and abs(optimizer * n / o0 - 1.5) < 0.05
