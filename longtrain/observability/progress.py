"""Console progress on the driver: one bar with ETA, loss and tokens/s, then a summary."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class RunSummary:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0

    def add(self, metrics: dict[str, Any]) -> None:
        self.steps = int(metrics["step"])
        self.losses.append(float(metrics["loss"]))
        self.tokens_per_s.append(float(metrics["tokens_per_s"]))

    def _mean(self, values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    def as_dict(self) -> dict[str, Any]:
        k = max(1, min(10, len(self.losses) // 4))
        # The first steps pay for warm-up (allocations, first collectives): skip them.
        steady = self.tokens_per_s[min(len(self.tokens_per_s) - 1, 3):] if self.tokens_per_s else []
        return {
            "steps": self.steps,
            "loss_first": self.losses[0] if self.losses else float("nan"),
            "loss_last": self.losses[-1] if self.losses else float("nan"),
            "loss_start_mean": self._mean(self.losses[:k]),
            "loss_end_mean": self._mean(self.losses[-k:]),
            "tokens_per_s": self._mean(steady),
            "wall_time_s": self.wall_time_s,
        }


def render_summary(result: dict[str, Any], *, extra: Optional[dict[str, str]] = None) -> str:
    """The few lines a user reads at the end of a run."""
    lines = [
        "longtrain run summary",
        f"  steps          {result['steps']}",
        f"  loss           {result['loss_start_mean']:.4f} -> {result['loss_end_mean']:.4f}"
        f"  (first step {result['loss_first']:.4f}, last step {result['loss_last']:.4f})",
        f"  tokens/s       {result['tokens_per_s']:,.0f}",
        f"  wall time      {result['wall_time_s']:.1f} s",
    ]
    lines += [f"  {key:<14} {value}" for key, value in (extra or {}).items()]
    return "\n".join(lines)


class Progress:
    def __init__(self, *, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=0.5)

    def update(self, metrics: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:,.0f}",
                             refresh=False)
        # metrics arrive every `logging.every` steps: advance to the reported step
        self.bar.update(int(metrics["step"]) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
