"""Progressive length schedule: train at growing sequence lengths (4K -> 16K -> 64K), each
stage with its own step count and, optionally, a larger CP degree.

Without `train.schedule` a run is one stage of `train.steps` steps at `data.seq_len`. Steps
are counted globally across stages (the LR schedule, checkpoints and the data position use
the global step), so a resumed run lands in the right stage by its step alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from longtrain.config.schema import RunConfig

__all__ = ["Stage", "apply_schedule", "schedule_problems", "stage_at", "stage_config", "stages"]


@dataclass(frozen=True)
class Stage:
    index: int
    # global steps [first_step, end_step)
    first_step: int
    end_step: int
    seq_len: int
    cp: int
    micro_batch_size: int


def stages(cfg: RunConfig) -> list[Stage]:
    if not cfg.train.schedule:
        return [Stage(0, 0, cfg.train.steps, cfg.data.seq_len, cfg.parallel.cp,
                      cfg.data.micro_batch_size)]
    out, first = [], 0
    for i, s in enumerate(cfg.train.schedule):
        out.append(Stage(i, first, first + s.steps, s.seq_len,
                         s.cp if s.cp is not None else cfg.parallel.cp,
                         s.micro_batch_size if s.micro_batch_size is not None
                         else cfg.data.micro_batch_size))
        first += s.steps
    return out


def stage_at(cfg: RunConfig, step: int) -> Stage:
    """The stage that runs global (0-based) `step`; the last stage for steps past the end."""
    all_stages = stages(cfg)
    for stage in all_stages:
        if step < stage.end_step:
            return stage
    return all_stages[-1]


def stage_config(cfg: RunConfig, stage: Stage) -> RunConfig:
    """`cfg` as the stage sees it: its sequence length, CP degree and micro-batch size."""
    data = dataclasses.replace(cfg.data, seq_len=stage.seq_len,
                               micro_batch_size=stage.micro_batch_size)
    parallel = dataclasses.replace(cfg.parallel, cp=stage.cp)
    return dataclasses.replace(cfg, data=data, parallel=parallel)


def apply_schedule(cfg: RunConfig) -> RunConfig:
    """With a schedule: train.steps becomes the stages' total and data.seq_len the first
    stage's; the model must hold the longest stage (max_position_embeddings is raised)."""
    if not cfg.train.schedule or schedule_problems(cfg):
        return cfg
    all_stages = stages(cfg)
    train = dataclasses.replace(cfg.train, steps=all_stages[-1].end_step)
    data = dataclasses.replace(cfg.data, seq_len=all_stages[0].seq_len)
    longest = max(s.seq_len for s in all_stages)
    model = cfg.model
    if longest > model.max_position_embeddings:
        model = dataclasses.replace(model, max_position_embeddings=longest)
    return dataclasses.replace(cfg, train=train, data=data, model=model)


def schedule_problems(cfg: RunConfig) -> list[str]:
    """The schedule's own fields; each stage's layout and data shape is then checked by
    validating its `stage_config` (see longtrain.planning.validate)."""
    out = []
    for i, s in enumerate(cfg.train.schedule):
        where = f"train.schedule[{i}]"
        if s.steps < 1:
            out.append(f"{where}.steps={s.steps} must be >= 1")
        if s.seq_len < 1:
            out.append(f"{where}.seq_len={s.seq_len} must be >= 1")
        if s.cp is not None and s.cp < 1:
            out.append(f"{where}.cp={s.cp} must be >= 1")
        if s.micro_batch_size is not None and s.micro_batch_size < 1:
            out.append(f"{where}.micro_batch_size={s.micro_batch_size} must be >= 1")
    return out
