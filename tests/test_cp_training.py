"""Training under context parallelism: the same loss curve at every CP / TP x CP layout,
the parity canary, and packed documents crossing shard boundaries."""

from __future__ import annotations

import os

import pytest
import torch

from longtrain.parallel.spawn import run_distributed

STEPS = 20
CURVE_RTOL = 1e-4


def _run_config(*, world: int, tp: int, cp: int, backend: str, check_every: int = 0):
    from longtrain.config.schema import RunConfig

    cfg = RunConfig()
    cfg.parallel.world_size, cfg.parallel.tp, cfg.parallel.cp = world, tp, cp
    cfg.attention.backend = backend
    cfg.attention.check_every = check_every
    # two packed documents per sequence: the boundary falls inside a CP shard
    cfg.data.seq_len, cfg.data.docs_per_seq = 384, 2
    cfg.data.batch_size, cfg.data.micro_batch_size = 2, 1
    cfg.train.steps = STEPS
    cfg.optim.warmup_steps = 2
    cfg.checkpoint.resume, cfg.checkpoint.every, cfg.checkpoint.save_final = "never", 0, False
    return cfg


def _train_curve(runtime, backend: str, check_every: int, out_path: str) -> None:
    from longtrain.planning.validate import validate
    from longtrain.train.loop import train

    d = runtime.dims
    cfg = _run_config(world=d.world_size, tp=d.tp, cp=d.cp, backend=backend,
                      check_every=check_every)
    validate(cfg)
    metrics = list(train(cfg, runtime))
    if runtime.rank == 0:
        torch.save(metrics, out_path)


@pytest.fixture(scope="module")
def reference_curve(tmp_path_factory) -> list[float]:
    path = str(tmp_path_factory.mktemp("cp1") / "m.pt")
    run_distributed(_train_curve, world_size=1, args=("dense", 0, path))
    return [m["loss"] for m in torch.load(path, weights_only=False)]


@pytest.mark.parametrize("backend,world,tp,cp", [("ring", 2, 1, 2), ("ring", 4, 1, 4),
                                                 ("ring", 4, 2, 2), ("ulysses", 2, 1, 2),
                                                 ("ulysses_ring", 4, 1, 4)],
                         ids=["ring-cp2", "ring-cp4", "ring-tp2xcp2", "ulysses-cp2",
                              "ulysses2xring2"])
def test_cp_training_matches_cp1_loss_curve(reference_curve, tmp_path, backend, world, tp, cp):
    from longtrain.attention.ulysses import hierarchical_cp_sizes

    path = os.path.join(tmp_path, "m.pt")
    run_distributed(_train_curve, world_size=world, tp=tp, cp=cp, args=(backend, 5, path),
                    cp_sizes=hierarchical_cp_sizes(backend, 0, cp))
    metrics = torch.load(path, weights_only=False)
    losses = [m["loss"] for m in metrics]
    assert len(losses) == STEPS
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference_curve))
    assert worst < CURVE_RTOL, (worst, losses, reference_curve)
    assert reference_curve[-1] < 0.8 * reference_curve[0], "the curve must actually train"
    # the canary ran at steps 0, 5, 10, 15 and found the ring equal to exact attention
    checked = [m["attn_parity_err"] for m in metrics if "attn_parity_err" in m]
    assert len(checked) == 4 and max(checked) < 1e-5, checked


def _broken_backend_is_caught(runtime) -> None:
    from longtrain.attention.base import register_attention
    from longtrain.attention.canary import ParityError
    from longtrain.attention.ring import ring_attention
    from longtrain.train.loop import train

    @register_attention("ring_off_by_one_percent", supports_cp=True)
    def broken(q, k, v, meta, ctx):
        return ring_attention(q, k, v, meta, ctx) * 1.01

    cfg = _run_config(world=2, tp=1, cp=2, backend="ring_off_by_one_percent", check_every=3)
    steps = train(cfg, runtime)
    with pytest.raises(ParityError, match=r"differs from exact attention by 1\.0\d*e-02"):
        next(steps)


def test_parity_canary_fails_loudly_on_a_wrong_backend():
    run_distributed(_broken_backend_is_caught, world_size=2, cp=2)


def test_the_canary_checks_sampled_blocks_exactly():
    """At CP = 1 the sampled-block reference equals dense attention (with documents and GQA);
    a wrong row in the last block is always caught, and the sample changes between checks."""
    from longtrain.attention.canary import parity_error, sample_rows
    from longtrain.attention.dense import dense_attention
    from longtrain.attention.types import AttentionContext, AttentionMeta

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 300, 4, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 300, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    doc = torch.cat([torch.zeros(130), torch.ones(100), torch.full((70,), 2)]).long()[None]
    meta = AttentionMeta(doc_ids_bt=doc)
    out = dense_attention(q, k, v, meta, AttentionContext())
    assert parity_error(q, k, v, out, meta, AttentionContext(), rows=32) < 1e-12
    wrong = out.clone()
    wrong[0, 290, 1] += 0.5
    assert parity_error(q, k, v, wrong, meta, AttentionContext(), rows=32) > 0.05
    draws = torch.Generator().manual_seed(0)
    first, second = (sample_rows(300, rows=32, generator=draws) for _ in range(2))
    assert first[-32:].tolist() == list(range(268, 300)) and len(first) <= 64
    assert not torch.equal(first, second)
