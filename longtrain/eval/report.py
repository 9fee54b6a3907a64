"""What an evaluation leaves behind: the summary dict (eval.json), the (length x depth)
heatmap PNG, the console table and the W&B metrics / table.

The summary's grid is `accuracy[i][j]` for `lengths[i]` and `depths[j]`; JSON keys of
per-length values are the lengths as strings.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from typing import Any, Callable

from longtrain.config.eval_schema import EvalRunConfig

EVAL_JSON = "eval.json"
HEATMAP_PNG = "needle_heatmap.png"


def _mean(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def summarize(result: dict[str, Any], *, cfg: EvalRunConfig, wall_time_s: float
              ) -> dict[str, Any]:
    """The eval.json content from `evaluate_with`'s result and the run's config."""
    ev, prompts = cfg.eval, result["prompts"]
    cell = lambda n, d: [r["correct"] for r in prompts  # noqa: E731
                         if r["length"] == n and r["depth"] == d]
    hf = ev.backend == "transformers"
    p = cfg.parallel
    layout = ({"world_size": 1, "tp": 1, "cp": 1, "dp": 1, "attention": "transformers"} if hf
              else {"world_size": p.world_size, "tp": p.tp, "cp": p.cp,
                    "dp": p.world_size // (p.tp * p.cp), "attention": cfg.attention.backend})
    return {
        "checkpoint": cfg.checkpoint,
        "task": ev.task,
        "backend": ev.backend,
        "precision": "fp32" if hf else cfg.precision,
        "lengths": list(ev.lengths),
        "depths": list(ev.depths),
        "samples": ev.samples,
        "seed": ev.seed,
        "accuracy": [[_mean(cell(n, d)) for d in ev.depths] for n in ev.lengths],
        "accuracy_by_length": {str(n): _mean([r["correct"] for r in prompts if r["length"] == n])
                               for n in ev.lengths},
        "accuracy_by_depth": {str(d): _mean([r["correct"] for r in prompts if r["depth"] == d])
                              for d in ev.depths},
        "overall": _mean([r["correct"] for r in prompts]),
        "perplexity": {str(r["length"]): r["ppl"] for r in result["perplexity"]},
        "perplexity_detail": result["perplexity"],
        "layout": layout,
        "wall_time_s": wall_time_s,
        "prompts": prompts,
    }


def _atomic(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp)` then rename over `path`: readers see the old file or the whole new one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # a plain open (not mkstemp, which makes the file private): the usual permissions
    stem, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(folder, f".{stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{ext}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(summary: dict[str, Any], path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
            f.flush()
            os.fsync(f.fileno())

    _atomic(path, write)


def plot_heatmap(summary: dict[str, Any], path: str) -> None:
    """Accuracy per cell: context length on x, depth on y (0 = start of the context at the
    top), each cell annotated."""
    # a new machine builds matplotlib's font cache on first use and says so: not news to a user
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lengths, depths = summary["lengths"], summary["depths"]
    # rows: depths, columns: lengths
    grid_dl = [[summary["accuracy"][i][j] for i in range(len(lengths))]
               for j in range(len(depths))]
    fig = Figure(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.55 * len(depths)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid_dl, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    for j in range(len(depths)):
        for i in range(len(lengths)):
            value = grid_dl[j][i]
            ax.text(i, j, "-" if math.isnan(value) else f"{value:.2f}", ha="center",
                    va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth")
    name = os.path.basename(os.path.normpath(str(summary["checkpoint"])))
    ax.set_title(f"{summary['task']} accuracy, {name} ({summary['samples']} per cell)",
                 fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png"))


def render_table(summary: dict[str, Any]) -> str:
    """The accuracy grid (depth rows x length columns), per-length and overall accuracy, and
    the perplexity per length, as the console shows them."""
    lengths, depths = summary["lengths"], summary["depths"]
    width = max(7, *(len(str(n)) + 1 for n in lengths))
    head = f"{'depth / length':<16}" + "".join(f"{n:>{width}}" for n in lengths)
    lines = [f"longtrain eval: {summary['task']} accuracy ({summary['samples']} prompts per "
             f"cell, {summary['backend']} backend)", head]
    for j, d in enumerate(depths):
        lines.append(f"{d:<16g}" + "".join(f"{summary['accuracy'][i][j]:>{width}.2f}"
                                           for i in range(len(lengths))))
    lines.append(f"{'all depths':<16}" + "".join(
        f"{summary['accuracy_by_length'][str(n)]:>{width}.2f}" for n in lengths))
    lines.append(f"{'overall':<16}{summary['overall']:>{width}.3f}")
    if summary["perplexity"]:
        lines.append("perplexity      " + "  ".join(f"{n}: {ppl:.3f}"
                                                   for n, ppl in summary["perplexity"].items()))
    return "\n".join(lines)


def wandb_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics: eval/<task>_acc@<length>, eval/<task>_acc, eval/ppl@<length>."""
    task = summary["task"]
    out = {f"eval/{task}_acc@{n}": acc for n, acc in summary["accuracy_by_length"].items()}
    out[f"eval/{task}_acc"] = summary["overall"]
    out.update({f"eval/ppl@{n}": ppl for n, ppl in summary["perplexity"].items()})
    out["eval/wall_time_s"] = summary["wall_time_s"]
    return out


def grid_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of the grid as a table: one row per (length, depth) cell."""
    rows = [[n, d, summary["accuracy"][i][j]]
            for i, n in enumerate(summary["lengths"]) for j, d in enumerate(summary["depths"])]
    return ["length", "depth", "accuracy"], rows
