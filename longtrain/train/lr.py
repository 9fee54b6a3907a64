"""The learning-rate schedule and AdamW's parameter groups, shared by the plain and the ZeRO
optimizers."""

from __future__ import annotations

import math

from longtrain.config.schema import OptimConfig


def lr_at(step: int, *, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate of (0-based) `step`: linear warmup, then cosine (or constant)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_groups(params: list, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices, none on vectors (norms, biases)."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
