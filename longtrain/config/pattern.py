"""`model.layer_pattern`: which layers are linear attention and which softmax."""

from __future__ import annotations

from typing import Any


def pattern_problems(pattern: str) -> list[str]:
    """What is wrong with a `model.layer_pattern` (see `layer_kinds`)."""
    if ":" in pattern:
        parts = pattern.split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts) or not any(int(p) for p in parts):
            return [f"model.layer_pattern={pattern!r}: a ratio is linear:softmax layer counts, "
                    f"e.g. '3:1'"]
        return []
    bad = sorted(set(pattern) - set("LS"))
    if bad:
        return [f"model.layer_pattern={pattern!r} may hold only L (linear) and S (softmax), "
                f"not {bad}"]
    return []


def layer_kinds(cfg: Any, *, linear_default: bool = False) -> list[str]:
    """"linear" or "softmax" for every layer of the model config `cfg`: `model.layer_pattern`
    repeated over the layers ("LLLS", or the ratio "3:1" = "LLLS"); an empty pattern is every
    layer softmax, or every layer linear with `linear_default` (attention=lasp1|lasp2)."""
    pattern = cfg.layer_pattern
    problems = pattern_problems(pattern)
    if problems:
        raise ValueError(problems[0])
    if ":" in pattern:
        linear, softmax = (int(p) for p in pattern.split(":"))
        pattern = "L" * linear + "S" * softmax
    pattern = pattern or ("L" if linear_default else "S")
    return ["linear" if pattern[i % len(pattern)] == "L" else "softmax"
            for i in range(cfg.num_layers)]
