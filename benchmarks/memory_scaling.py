"""Activation memory per rank vs sequence length, for every attention backend and CP degree,
on packed documents: one training step's peak beside the planner's estimate, and the longest
sequence a 24 GiB machine fits on two ranks; prints tables and writes a section of
BENCHMARKS.md.

    python -m benchmarks.memory_scaling --lengths 8192,16384,32768,65536 --out BENCHMARKS.md \
        --plot benchmarks/memory_scaling.png
    python -m benchmarks.memory_scaling --model wide --lengths 2048,4096 --out BENCHMARKS.md

Legend: T global sequence length, c the CP degree; MiB per rank (the largest rank). How each
figure is measured is `METHOD` below, which also goes into BENCHMARKS.md with the tables.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from benchmarks.attention import _pin_mmap_threshold, machine
from benchmarks.report import (add_output_args, argument_parser, command_line, join_section,
                               replace_section)

MIB = float(1 << 20)
GIB = float(1 << 30)
DOCS = 16
# (label, attention.backend, attention.softmax, model.layer_pattern, cp)
CONFIGS = (
    ("dense", "dense", "allgather", "", 1),
    ("ring", "ring", "allgather", "", 2),
    ("ulysses", "ulysses", "allgather", "", 2),
    ("allgather", "allgather", "allgather", "", 2),
    ("s2", "s2", "allgather", "", 2),
    ("lasp2 + allgather (LS)", "lasp2", "allgather", "LS", 2),
    ("ring", "ring", "allgather", "", 4),
    ("ulysses_ring 2x2", "ulysses_ring", "allgather", "", 4),
)
# `--model`: the default tiny model with a byte vocabulary (its activations dominate its
# state), or a wide one: Llama-3-8B's width and vocabulary on two layers (the LM head and the
# loss dominate), with the backends whose activations differ most
MODELS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256),
    "wide": dict(vocab_size=131072, hidden_size=2048, intermediate_size=5632, num_layers=2,
                 num_heads=16, num_kv_heads=4),
}
LOSS_CHUNK = {"tiny": 4096, "wide": 1024}
WIDE_CONFIGS = ("dense", "ring", "ulysses", "lasp2 + allgather (LS)")
LENGTHS = (8192, 16384, 32768)
QUICK_LENGTHS = (1024, 2048)
MACHINE_GIB = 24.0
TARGET_VS_RING, TARGET_ESTIMATE = 1.25, 0.15
TITLE = "Memory scaling: activation memory per rank vs sequence length, every backend"
TITLE_WIDE = ("Memory scaling, wide model (hidden 2048, vocabulary 131072): activation memory "
              "per rank vs sequence length")

METHOD = """\
- **One training step per (backend, CP, T)**, each in its own world of c gloo processes x 1
  thread: every rank builds the model (`train.build.build_model`; `--model tiny`: the tiny
  model of conf/model/tiny.yaml with a 256-id vocabulary, `train.loss_chunk` 4096; `--model
  wide`: hidden 2048, MLP 5632, 16 / 4 heads, vocabulary 131072, untied, 2 layers,
  `train.loss_chunk` 1024; fp32, memory policy none), then runs one micro-batch of T seeded random tokens packed as 16 documents (random
  boundaries, crossing the ranks' zigzag shards): `model(..., head=False)`, the chunked loss
  (`train.loss.chunked_loss_sum`) and its backward. No optimizer step.
- **Peak MiB/rank**: glibc's mmap threshold pinned at 64 KiB (every tensor its own mapping,
  counted when touched and returned when freed), one warm-up step at a short length, then
  the kernel's peak-RSS counter reset (`5 > /proc/self/clear_refs`) right before the step;
  the figure is VmHWM minus the RSS at the reset: everything the step adds (saved
  activations, the loss chunk's logits, the gradients, the attention's transients, the
  communication buffers), not the parameters. Largest rank.
- **Estimate**: the planner's `activation_bytes(Shape.of(cfg), Policy())["total"]` plus the
  gradients (`static_bytes(...)["grads"]`), what `--check` and `memory=auto` use.
- The estimate counts every gradient as alive at the activation peak. In the backward the
  early layers' and the embedding's gradients are made as the activations they replace are
  freed, so the estimate is high by up to the smaller of the two: little on the tiny model
  (activations dominate), up to 27% on the wide two-layer one, whose 1 GiB embedding
  gradient comes last (conservative: `memory=auto` never picks a policy that does not fit).
- **Longest T on 24 GiB, two ranks**: from the least-squares line through the measured
  peaks of each backend at CP=2 (peak = a + b T), plus the model state (parameters,
  gradients, AdamW), the T where two ranks reach 24 GiB.
"""


@dataclass
class Row:
    label: str
    backend: str
    cp: int
    length: int
    peak_mib: Optional[float]
    estimate_mib: float
    error: str = ""


def _packed(length: int, gen: torch.Generator) -> torch.Tensor:
    cuts = sorted(torch.randperm(length - 1, generator=gen)[:DOCS - 1].add(1).tolist())
    doc = torch.zeros(length, dtype=torch.long)
    for c in cuts:
        doc[c:] += 1
    return doc[None]


def run_config(backend: str, softmax: str, pattern: str, cp: int, model: str = "tiny") -> Any:
    from longtrain.config.schema import RunConfig

    cfg = RunConfig()
    for k, v in MODELS[model].items():
        setattr(cfg.model, k, v)
    cfg.train.loss_chunk = LOSS_CHUNK[model]
    cfg.model.layer_pattern = pattern
    cfg.attention.backend, cfg.attention.softmax = backend, softmax
    cfg.parallel.world_size, cfg.parallel.cp = cp, cp
    cfg.data.micro_batch_size, cfg.data.batch_size = 1, 1
    return cfg


def _step(runtime: Any, model: Any, cfg: Any, length: int) -> None:
    from longtrain.parallel.layout import split_for_cp
    from longtrain.train.build import attention_context
    from longtrain.train.loss import chunked_loss_sum

    gen = torch.Generator().manual_seed(length)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, length), generator=gen)
    doc, positions = _packed(length, gen), torch.arange(length)[None]
    shard = lambda x: split_for_cp(x, cp_size=runtime.dims.cp, cp_rank=runtime.cp_rank)  # noqa: E731
    hidden = model(shard(tokens), positions_bt=shard(positions), doc_ids_bt=shard(doc),
                   seq_len=length, ctx=attention_context(runtime), head=False)
    chunked_loss_sum(model.logits, hidden, shard(tokens), chunk=cfg.train.loss_chunk).backward()
    for p in model.parameters():
        p.grad = None


def _worker(runtime: Any, backend: str, softmax: str, pattern: str, model_name: str,
            lengths: list[int], path: str) -> None:
    import torch.distributed as dist

    from longtrain.observability.resources import reset_peak_rss, status_kib
    from longtrain.train.build import build_model

    _pin_mmap_threshold()
    cfg = run_config(backend, softmax, pattern, runtime.dims.cp, model_name)
    model = build_model(cfg, runtime)
    _step(runtime, model, cfg, 256 * runtime.dims.cp)
    peaks = []
    for length in lengths:
        dist.barrier()
        base_kib = reset_peak_rss()
        _step(runtime, model, cfg, length)
        peaks.append((status_kib("VmHWM") - base_kib) * 1024.0)
    t = torch.tensor(peaks, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if runtime.rank == 0:
        with open(path, "w") as f:
            json.dump({"peaks": t.tolist()}, f)


def estimate_bytes(cfg: Any, length: int) -> float:
    import dataclasses

    from longtrain.memory.estimate import Policy, Shape, activation_bytes, static_bytes

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=length))
    shape = Shape.of(cfg)
    return activation_bytes(shape, Policy())["total"] + static_bytes(shape)["grads"]


def state_bytes(cfg: Any) -> float:
    from longtrain.memory.estimate import Shape, static_bytes

    return static_bytes(Shape.of(cfg))["total"]


def _run_world(args: tuple, *, cp: int, cp_sizes: Optional[tuple[int, int]]
               ) -> tuple[Optional[dict], Optional[str]]:
    """`_worker(runtime, *args, path)` in a world of `cp` gloo processes x 1 thread (with the
    2-D CP groups `cp_sizes`): (its JSON, None), or (None, why) when the world crashed."""
    import tempfile

    from benchmarks.attention import _reason
    from longtrain.parallel.spawn import run_distributed

    with tempfile.TemporaryDirectory(prefix="longtrain-bench-") as tmp:
        path = os.path.join(tmp, "rows.json")
        try:
            run_distributed(_worker, world_size=cp, cp=cp, threads=1, args=(*args, path),
                            cp_sizes=cp_sizes)
            with open(path) as f:
                return json.load(f), None
        except Exception as exc:  # noqa: BLE001 - a crashed world becomes n/a rows
            return None, _reason(exc)


def configs_for(model: str) -> tuple:
    return CONFIGS if model == "tiny" else tuple(c for c in CONFIGS
                                                 if c[0] in WIDE_CONFIGS and c[4] <= 2)


def measure(lengths: list[int], model: str = "tiny") -> list[Row]:
    from longtrain.attention.plan import cp_group_sizes

    rows = []
    for label, backend, softmax, pattern, cp in configs_for(model):
        cfg = run_config(backend, softmax, pattern, cp, model)
        # one world per backend and CP, every length in it (each step's peak measured alone)
        got, why = _run_world((backend, softmax, pattern, model, lengths), cp=cp,
                              cp_sizes=cp_group_sizes(cfg.attention, cp))
        for i, length in enumerate(lengths):
            peak = None if got is None else got["peaks"][i] / MIB
            rows.append(Row(label, backend, cp, length, peak,
                            estimate_bytes(cfg, length) / MIB, why or ""))
            shown = f"n/a ({why})" if peak is None else f"{peak:.0f} MiB"
            print(f"{label} cp={cp} T={length}: {shown}", flush=True)
    return rows


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return my - slope * mx, slope


def longest_on_machine(rows: list[Row], *, cp: int = 2, gib: float = MACHINE_GIB,
                       model: str = "tiny") -> dict[str, Optional[int]]:
    """Per backend at `cp`: the T where `cp` ranks of (model state + the fitted peak) reach
    `gib` GiB in all."""
    out: dict[str, Optional[int]] = {}
    for label, backend, softmax, pattern, c in configs_for(model):
        if c != cp:
            continue
        pts = [(r.length, r.peak_mib * MIB) for r in rows
               if r.label == label and r.cp == cp and r.peak_mib is not None]
        if len(pts) < 2:
            out[label] = None
            continue
        a, b = fit_line([p[0] for p in pts], [p[1] for p in pts])
        room = gib * GIB / cp - state_bytes(run_config(backend, softmax, pattern, cp, model)) - a
        out[label] = int(room / b) if b > 0 else None
    return out


def table(rows: list[Row], model: str = "tiny") -> str:
    lengths = sorted({r.length for r in rows})
    head = ["backend", "CP"] + [f"T={n // 1024}K MiB (est., meas./est.)" for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ring = {(r.cp, r.length): r.peak_mib for r in rows if r.backend == "ring"}
    for label, _, _, _, cp in configs_for(model):
        cells = [label, str(cp)]
        for n in lengths:
            r = next((x for x in rows if x.label == label and x.cp == cp and x.length == n),
                     None)
            if r is None or r.peak_mib is None:
                cells.append("n/a" if r is None else f"n/a ({r.error})")
                continue
            vs_ring = ring.get((cp, n))
            cells.append(f"{r.peak_mib:,.0f} ({r.estimate_mib:,.0f}, "
                         f"{r.peak_mib / r.estimate_mib:.2f})"
                         + (f", {r.peak_mib / vs_ring:.2f}x ring" if vs_ring and
                            r.backend != "ring" else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(rows: list[Row], fits: dict[str, Optional[int]]) -> list[str]:
    out = []
    ring = {(r.cp, r.length): r.peak_mib for r in rows if r.backend == "ring" and r.peak_mib}
    worst = max((r.peak_mib / ring[(r.cp, r.length)] for r in rows
                 if r.peak_mib and (r.cp, r.length) in ring), default=None)
    if worst is not None:
        out.append(f"largest activation peak vs ring at the same T and CP: {worst:.2f}x "
                   f"(target <= {TARGET_VS_RING}x): "
                   f"{'met' if worst <= TARGET_VS_RING else 'not met'}")
    errs = [abs(r.peak_mib / r.estimate_mib - 1) for r in rows if r.peak_mib]
    if errs:
        out.append(f"planner estimate vs measured: worst {max(errs):.0%} off (target <= "
                   f"{TARGET_ESTIMATE:.0%}): {'met' if max(errs) <= TARGET_ESTIMATE else 'not met'}")
    for label, t in fits.items():
        out.append(f"{label} at CP=2: longest T on {MACHINE_GIB:g} GiB, two ranks ~ "
                   f"{'n/a' if t is None else f'{t / 1024:,.0f}K'} tokens")
    return out


def plot(rows: list[Row], path: str, model: str) -> None:
    """Peak MiB per rank vs T, one line per backend and CP (log-log: linear growth is a
    slope of 1), the planner's estimates as dotted lines of the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for i, (label, _, _, _, cp) in enumerate(configs_for(model)):
        pts = sorted((r.length, r.peak_mib, r.estimate_mib) for r in rows
                     if r.label == label and r.cp == cp and r.peak_mib is not None)
        if not pts:
            continue
        n, peak, est = zip(*pts)
        ax.plot(n, peak, marker="o", color=f"C{i}", label=f"{label}, CP={cp}")
        ax.plot(n, est, linestyle=":", color=f"C{i}")
    lengths = sorted({r.length for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
    ax.set_xlabel("sequence length T (16 packed documents)")
    ax.set_ylabel("peak MiB per rank of one step (dotted: planner)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"{model} model, {machine()}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> list[Row]:
    p = argument_parser(__doc__, METHOD)
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)),
                   help="comma-separated global sequence lengths (multiples of 8)")
    p.add_argument("--model", choices=sorted(MODELS), default="tiny",
                   help="tiny (every backend) or wide (hidden 2048, vocabulary 131072, 2 "
                        "layers; dense, ring, ulysses and lasp2 at CP <= 2)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: lengths {QUICK_LENGTHS}")
    p.add_argument("--plot", default=None, help="write a PNG of memory vs T here")
    p.add_argument("--from-json", default=None,
                   help="no run: an earlier --json's measured peaks with the current "
                        "planner's estimates")
    add_output_args(p)
    args = p.parse_args(argv)
    lengths = list(QUICK_LENGTHS) if args.quick else [int(x) for x in args.lengths.split(",")]
    odd = [n for n in lengths if n <= 0 or n % 8]
    if odd:
        raise ValueError(f"--lengths {odd} are not positive multiples of 8 (2 x CP=4)")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    if args.from_json:
        # the measured peaks of an earlier run, beside the current planner's estimates
        with open(args.from_json) as f:
            saved = json.load(f)
        args.model = saved.get("model", "tiny")
        rows = [Row(**r) for r in saved["rows"]]
        for r in rows:
            cfg = next(run_config(b, s, pat, c, args.model) for lab, b, s, pat, c in CONFIGS
                       if lab == r.label and c == r.cp)
            r.estimate_mib = estimate_bytes(cfg, r.length) / MIB
    else:
        rows = measure(lengths, args.model)
    fits = longest_on_machine(rows, model=args.model)
    print(f"# {machine()}")
    print(table(rows, args.model))
    print("\n".join(verdicts(rows, fits)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "rows": [asdict(r) for r in rows],
                       "longest_t_cp2": fits}, f, indent=1)
    if args.plot:
        plot(rows, args.plot, args.model)
    if args.out:
        name, title = (("memory_scaling", TITLE) if args.model == "tiny" else
                       ("memory_scaling_wide", TITLE_WIDE))
        figure = []
        if args.plot:
            where = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.out)))
            figure = [f"![memory per rank vs T]({where})"]
        body = join_section([f"`{command_line('benchmarks.memory_scaling', argv)}` on "
                             f"{machine()}.", table(rows, args.model), *figure],
                            verdicts(rows, fits), METHOD)
        replace_section(args.out, name, title, body)
    return rows


if __name__ == "__main__":
    main()
