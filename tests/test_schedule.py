"""Progressive length schedule: stages change the sequence length and grow CP mid-run; the
curve equals one process's, and a resume inside a later stage continues it."""

from __future__ import annotations

import os
import shutil

import torch

from longtrain.config.schema import RunConfig, StageConfig
from longtrain.parallel.spawn import run_distributed

# the CP loss-curve tolerance (layouts sum in different orders)
CURVE_RTOL = 1e-4


def _cfg(world: int, out: str, *, resume: str = "never") -> RunConfig:
    cfg = RunConfig()
    cfg.parallel.world_size = world
    cfg.attention.backend = "ring"
    cfg.data.batch_size = 2
    cfg.train.schedule = [StageConfig(seq_len=256, steps=3),
                          StageConfig(seq_len=512, steps=3, cp=world)]
    cfg.optim.warmup_steps = 2
    cfg.checkpoint.every, cfg.checkpoint.keep, cfg.checkpoint.resume = 4, 3, resume
    cfg.output_dir = out
    from longtrain.config.schedule import apply_schedule

    return apply_schedule(cfg)


def _run(rt, out: str, resume: str, tag: str) -> None:
    from longtrain.planning.validate import validate
    from longtrain.train.loop import TrainState, train

    cfg = _cfg(rt.dims.world_size, out, resume=resume)
    validate(cfg)
    state = TrainState.create(cfg, rt)
    metrics = [(m["step"], m["seq_len"], m["loss"], state.runtime.dims.cp)
               for m in train(cfg, rt, state=state)]
    if rt.rank == 0:
        torch.save(metrics, os.path.join(out, f"{tag}.pt"))


def test_schedule_grows_length_and_cp_and_resumes_inside_a_stage(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    os.makedirs(one), os.makedirs(two)
    run_distributed(_run, world_size=1, args=(one, "never", "curve"))
    run_distributed(_run, world_size=2, args=(two, "never", "curve"))
    ref = torch.load(os.path.join(one, "curve.pt"))
    got = torch.load(os.path.join(two, "curve.pt"))
    assert [(s, t) for s, t, _, _ in got] == [(1, 256), (2, 256), (3, 256), (4, 512), (5, 512),
                                              (6, 512)]
    # stage 0 runs data parallel (cp 1), stage 1 context parallel over both ranks
    assert [cp for *_, cp in got] == [1, 1, 1, 2, 2, 2]
    for (_, _, a, _), (_, _, b, _) in zip(got, ref):
        assert abs(a - b) / abs(b) < CURVE_RTOL, (got, ref)
    # the step-4 checkpoint (inside stage 1, saved at cp 2) resumes at cp 2 and continues
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(two, "checkpoints", "step_00000004"),
                    os.path.join(resumed, "checkpoints", "step_00000004"))
    run_distributed(_run, world_size=2, args=(resumed, "auto", "curve"))
    tail = torch.load(os.path.join(resumed, "curve.pt"))
    assert [s for s, *_ in tail] == [5, 6]
    for (_, _, a, _), (_, _, b, _) in zip(tail, got[4:]):
        assert abs(a - b) / abs(b) < 1e-6, (tail, got)


def test_schedule_problems_name_the_stage_and_field(tmp_path):
    from longtrain.planning.validate import problems
    from longtrain.config.schedule import apply_schedule

    cfg = RunConfig()
    cfg.parallel.world_size = 2
    cfg.train.schedule = [StageConfig(seq_len=1024, steps=10),
                          StageConfig(seq_len=1030, steps=5, cp=2),
                          StageConfig(seq_len=2048, steps=0, cp=3)]
    found = problems(apply_schedule(cfg))
    assert "train.schedule[2].steps=0 must be >= 1" in found, found
    cfg.train.schedule[2] = StageConfig(seq_len=2048, steps=5, cp=3)
    found = problems(apply_schedule(cfg))
    assert any(p.startswith("train.schedule[1]: data.seq_len=1030 is not divisible by "
                            "2 * parallel.cp = 4") for p in found), found
    assert any(p.startswith("train.schedule[2]: parallel.world_size=2 is not divisible by "
                            "parallel.tp * parallel.cp = 1 * 3") for p in found), found
    # cp > 1 with a backend that has no context parallelism
    assert any(p.startswith("train.schedule[1]: attention.backend='dense' does not support")
               for p in found), found
    ok = apply_schedule(RunConfig(train=cfg.train.__class__(
        schedule=[StageConfig(seq_len=1024, steps=10), StageConfig(seq_len=8192, steps=5)])))
    assert ok.train.steps == 15 and ok.data.seq_len == 1024
    assert ok.model.max_position_embeddings == 8192
    assert not problems(ok)
