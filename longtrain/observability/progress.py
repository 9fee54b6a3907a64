"""Console progress on the driver: one bar with ETA, loss and tokens/s, then a summary."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, TextIO

from longtrain.observability.peaks import source_words


@dataclass
class RunSummary:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    mfu: list[float] = field(default_factory=list)
    mfu_vs_gemm: list[float] = field(default_factory=list)
    comm_frac: list[float] = field(default_factory=list)
    mem_peak_gib: float = 0.0
    peak_tflops: float = float("nan")
    gemm_tflops: float = float("nan")
    # index into observability.peaks.SOURCES (-1: not reported)
    mfu_peak_source: int = -1
    nonfinite_steps: list[int] = field(default_factory=list)
    wall_time_s: float = 0.0

    def add(self, metrics: dict[str, Any]) -> None:
        self.steps = int(metrics["step"])
        self.losses.append(float(metrics["loss"]))
        if not math.isfinite(self.losses[-1]):
            self.nonfinite_steps.append(self.steps)
        self.tokens_per_s.append(float(metrics["tokens_per_s"]))
        if "mfu" in metrics:
            self.mfu.append(float(metrics["mfu"]))
            self.comm_frac.append(float(metrics["comm_exposed_frac"]))
            self.mem_peak_gib = max(self.mem_peak_gib, float(metrics["mem_peak_gib_max"]))
            self.peak_tflops = float(metrics["peak_tflops"])
            if "mfu_vs_gemm" in metrics:
                self.mfu_vs_gemm.append(float(metrics["mfu_vs_gemm"]))
                self.gemm_tflops = float(metrics["gemm_tflops"])
                self.mfu_peak_source = int(metrics["mfu_peak_source"])

    def _mean(self, values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    def as_dict(self) -> dict[str, Any]:
        k = max(1, min(10, len(self.losses) // 4))
        # The first steps pay for warm-up (allocations, first collectives): skip them.
        steady = self.tokens_per_s[min(len(self.tokens_per_s) - 1, 3):] if self.tokens_per_s else []
        skip = min(len(self.mfu) - 1, 3) if self.mfu else 0
        return {
            "steps": self.steps,
            "loss_first": self.losses[0] if self.losses else float("nan"),
            "loss_last": self.losses[-1] if self.losses else float("nan"),
            "loss_start_mean": self._mean(self.losses[:k]),
            "loss_end_mean": self._mean(self.losses[-k:]),
            "loss_mean_of": k,
            "tokens_per_s": self._mean(steady),
            "mfu": self._mean(self.mfu[skip:]),
            "comm_exposed_frac": self._mean(self.comm_frac[skip:]),
            "mem_peak_gib_max": self.mem_peak_gib,
            "peak_tflops": self.peak_tflops,
            "mfu_vs_gemm": self._mean(self.mfu_vs_gemm[min(len(self.mfu_vs_gemm) - 1, 3):]
                                      if self.mfu_vs_gemm else []),
            "gemm_tflops": self.gemm_tflops,
            "mfu_peak_source": self.mfu_peak_source,
            "nonfinite_steps": len(self.nonfinite_steps),
            "wall_time_s": self.wall_time_s,
        }


def render_summary(result: dict[str, Any], *, extra: Optional[dict[str, str]] = None) -> str:
    """The few lines a user reads at the end of a run."""
    lines = [
        "longtrain run summary",
        f"  steps          {result['steps']}",
        f"  loss           {result['loss_start_mean']:.4f} -> {result['loss_end_mean']:.4f}"
        f"  (means of the first / last {result.get('loss_mean_of', 1)} logged steps; first "
        f"step {result['loss_first']:.4f}, last step {result['loss_last']:.4f})",
        f"  tokens/s       {result['tokens_per_s']:,.0f}",
    ]
    if math.isfinite(result.get("mfu", float("nan"))):
        source = source_words(int(result.get("mfu_peak_source", -1)))
        lines.append(f"  MFU            {100 * result['mfu']:.1f}% of {result['peak_tflops']:.3g} "
                     f"TFLOP/s per device" + (f" ({source})" if source else ""))
        if math.isfinite(result.get("mfu_vs_gemm", float("nan"))):
            lines.append(f"  MFU vs GEMM    {100 * result['mfu_vs_gemm']:.1f}% of the measured "
                         f"GEMM, {result['gemm_tflops']:.3g} TFLOP/s per device")
        lines += [
            f"  comm exposed   {100 * result['comm_exposed_frac']:.1f}% of step time",
            f"  peak memory    {result['mem_peak_gib_max']:.2f} GiB (largest rank)",
        ]
    if result.get("nonfinite_steps"):
        lines.append(f"  non-finite     loss at {result['nonfinite_steps']} logged step(s)")
    lines.append(f"  wall time      {result['wall_time_s']:.1f} s")
    lines += [f"  {key:<14} {value}" for key, value in (extra or {}).items()]
    return "\n".join(lines)


def summary_line(result: dict[str, Any]) -> str:
    """The run in one line (e.g. one per job of a Slurm sweep)."""
    line = (f"{result['steps']} steps, loss {result['loss_start_mean']:.4f} -> "
            f"{result['loss_end_mean']:.4f}, {result['tokens_per_s']:,.0f} tokens/s, "
            f"{result['wall_time_s']:.1f} s")
    if result.get("stopped_at"):
        line += f", stopped at step {result['stopped_at']} on a signal"
    if result.get("output_dir"):
        line += f" -> {result['output_dir']}"
    return line


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Console progress on `stream` (stderr): a tqdm bar when it is a terminal; otherwise
    (a batch job's log, a pipe) one plain line per report, i.e. every `logging.every` steps,
    instead of the bar's `\r` frames (tqdm's `disable=None` rule). Nothing when disabled."""

    def __init__(self, *, total: int, enabled: bool, stream: Optional[TextIO] = None) -> None:
        self.bar = None
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.lines = enabled and not _is_terminal(self.stream)
        if enabled and not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True,
                            file=self.stream, mininterval=0.5)

    def update(self, metrics: dict[str, Any]) -> None:
        if self.lines:
            mfu = f"  mfu {100 * metrics['mfu']:.1f}%" if "mfu" in metrics else ""
            print(f"train step {int(metrics['step'])}/{self.total}  loss {metrics['loss']:.4f}  "
                  f"tokens/s {metrics['tokens_per_s']:,.0f}{mfu}", file=self.stream, flush=True)
            return
        if self.bar is None:
            return
        postfix = {"loss": f"{metrics['loss']:.4f}", "tok_s": f"{metrics['tokens_per_s']:,.0f}"}
        if "mfu" in metrics:
            postfix["mfu"] = f"{100 * metrics['mfu']:.1f}%"
        self.bar.set_postfix(postfix, refresh=False)
        # metrics arrive every `logging.every` steps: advance to the reported step
        self.bar.update(int(metrics["step"]) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
