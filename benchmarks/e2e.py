"""End-to-end training throughput: tokens/s and MFU against the GEMM peak measured in the same
run, fp32 and bf16, for each parallel layout of a 2-rank world.

    python -m benchmarks.e2e [--quick] [--seq-len 8192] [--out BENCHMARKS.md] [--json rows.json]

Each row is the real training loop (`longtrain.train.loop.train`: synthetic passkey data,
model, attention backend, loss, backward, AdamW, gradient all-reduce) in a world of 2 gloo
processes x 1 thread, timed per optimizer step after warm-up steps. How each figure is
measured is `METHOD` below, which also goes into BENCHMARKS.md with the table.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from benchmarks.attention import machine
from benchmarks.report import (add_output_args, argument_parser, command_line, compose_config,
                               join_section, replace_section)
from longtrain.config.schema import RunConfig

TITLE = "End-to-end training: tokens/s and MFU against the measured GEMM peak"
WORLD = 2
# (label, attention backend, cp): every layout a 2-rank world has for the tiny model
LAYOUTS = (("dense DP=2", "dense", 1), ("ring CP=2", "ring", 2), ("ulysses CP=2", "ulysses", 2))
PRECISIONS = ("fp32", "bf16")
MODELS = ("tiny",)
TARGET_MFU = 0.40
TARGET_LENGTH = 8192
QUICK_LENGTH = 1024

METHOD = """\
- **What runs**: `longtrain.train.loop.train` (the training loop the Ray workers run) in a
  world of 2 gloo processes x 1 thread each (`run_distributed`), one sequence of `seq_len`
  tokens per rank and step for DP=2 (global batch 2) and one sequence split over the 2 ranks
  for CP=2 (global batch 1, zigzag shards): the synthetic passkey task, the model preset,
  AdamW, gradient clipping, the gradient all-reduce; no checkpoint, no W&B. The layouts and
  precisions run one after the other in the same process tree.
- **Time**: each optimizer step's wall time (`step_time_s`, from the batch arriving to the
  optimizer step done, all ranks in lockstep); the table shows the median over the measured
  steps after the warm-up steps (first-call costs: allocator, gloo buffers, kernel choice).
  tokens/s = global tokens per step / step time.
- **MFU**: model FLOPs per step (`longtrain.model.flops.step_flops`: the projections,
  SwiGLU, LM head, and causal attention counted as T(T+1)/2 query-key pairs per head;
  fwd+bwd = 3x forward; recomputation not counted) / step time / the sum over ranks of each
  rank's **GEMM peak measured in the same run**: a square 1024 GEMM in the training dtype,
  timed for 0.3 s on that rank's one thread when its training loop starts
  (`longtrain.observability.resources.measure_gemm_tflops`). TFLOP/s/rank = FLOPs / step time
  / ranks. bf16: weights and activations in bf16, fp32 master weights in the optimizer, so
  its peak is the bf16 GEMM's.
- **Exposed comm**: the share of step time a rank spent blocked in `torch.distributed`
  calls (async ones only inside `wait()`), the slowest rank (`comm_exposed_frac`).
- **Peak GiB**: the largest rank's peak RSS during a step (`/proc/self/clear_refs` reset per
  step).
"""


@dataclass
class Row:
    model: str
    layout: str
    backend: str
    cp: int
    precision: str
    seq_len: int
    # medians over the measured steps; None when the row failed
    step_time_s: Optional[float] = None
    step_range_s: Optional[tuple[float, float]] = None
    tokens_per_s: Optional[float] = None
    tflops_per_rank: Optional[float] = None
    peak_tflops: Optional[float] = None
    mfu: Optional[float] = None
    comm_exposed_frac: Optional[float] = None
    mem_peak_gib: Optional[float] = None
    loss_first: Optional[float] = None
    loss_last: Optional[float] = None
    error: Optional[str] = None


def make_config(model: str, backend: str, cp: int, precision: str, seq_len: int, steps: int,
                output_dir: str) -> RunConfig:
    """The run a row measures, composed as `longtrain-train <overrides>` would be."""
    return compose_config(
        [f"model={model}", f"attention={backend}", f"parallel.world_size={WORLD}",
         f"parallel.cp={cp}", f"train.precision={precision}", f"data.seq_len={seq_len}",
         f"data.batch_size={WORLD // cp}", f"train.steps={steps}", "train.save_hf=false",
         "checkpoint.resume=never", "checkpoint.every=0", "checkpoint.save_final=false",
         f"output_dir={output_dir}"])


def _train_worker(runtime: Any, cfg: RunConfig, out_path: str) -> None:
    from longtrain.train.loop import train

    metrics = list(train(cfg, runtime))
    if runtime.rank == 0:
        torch.save(metrics, out_path)


def measure(model: str, label: str, backend: str, cp: int, precision: str, seq_len: int, *,
            warmup: int, steps: int) -> Row:
    from longtrain.parallel.spawn import run_distributed

    from benchmarks.attention import _reason

    row = Row(model, label, backend, cp, precision, seq_len)
    try:
        with tempfile.TemporaryDirectory(prefix="longtrain-e2e-") as tmp:
            cfg = make_config(model, backend, cp, precision, seq_len, warmup + steps, tmp)
            path = os.path.join(tmp, "metrics.pt")
            run_distributed(_train_worker, world_size=WORLD, cp=cp, threads=1,
                            args=(cfg, path))
            metrics = torch.load(path, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - reported as a table row
        row.error = _reason(exc)
        return row
    timed = metrics[warmup:]
    med = lambda key: statistics.median(float(m[key]) for m in timed)  # noqa: E731
    row.step_time_s = med("step_time_s")
    times = [float(m["step_time_s"]) for m in timed]
    row.step_range_s = (min(times), max(times))
    row.tokens_per_s = cfg.data.batch_size * seq_len / row.step_time_s
    row.tflops_per_rank = med("tflops")
    row.peak_tflops = med("peak_tflops")
    row.mfu = med("mfu")
    row.comm_exposed_frac = med("comm_exposed_frac")
    row.mem_peak_gib = max(float(m["mem_peak_gib_max"]) for m in timed)
    row.loss_first, row.loss_last = float(metrics[0]["loss"]), float(metrics[-1]["loss"])
    return row


def kernel_rates(precision: str, seq_len: int, heads: int, head_dim: int) -> dict[str, float]:
    """One thread's TFLOP/s for the square GEMM MFU is measured against and for causal SDPA
    fwd+bwd at the run's length and the model's head shape: the ceiling attention puts on
    MFU where it is most of the FLOPs."""
    import time

    import torch.nn.functional as F

    from longtrain.observability.flops import causal_pairs
    from longtrain.observability.resources import measure_gemm_tflops

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gemm = measure_gemm_tflops(torch.device("cpu"), dtype)
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, seq_len, head_dim, generator=gen).to(dtype)
                   .requires_grad_() for _ in range(3))
        dout = torch.randn(1, heads, seq_len, head_dim, generator=gen).to(dtype)

        def step() -> None:
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout)

        step()
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    # fwd QK^T and PV, bwd 5 matmuls: 3.5x the forward's 2 matmuls, over T(T+1)/2 pairs
    flops = 3.5 * 4.0 * head_dim * heads * causal_pairs(seq_len)
    return {"precision": precision, "gemm_tflops": gemm, "sdpa_tflops": flops / seconds / 1e12}


def kernel_table(rates: list[dict[str, float]], heads: int, head_dim: int) -> str:
    lines = [f"| precision | GEMM TFLOP/s (1 thread) | causal SDPA fwd+bwd TFLOP/s ({heads} heads "
             f"x {head_dim}) | SDPA / GEMM |", "|---|---|---|---|"]
    for r in rates:
        lines.append(f"| {r['precision']} | {r['gemm_tflops']:.3f} | {r['sdpa_tflops']:.3f} "
                     f"| {r['sdpa_tflops'] / r['gemm_tflops']:.0%} |")
    return "\n".join(lines)


def table(rows: list[Row]) -> str:
    lines = ["| model | T | layout | precision | step s | min-max s | tokens/s | TFLOP/s/rank "
             "| GEMM peak TFLOP/s/rank | MFU | comm exposed | peak GiB/rank | loss first -> last |",
             "|" + "---|" * 13]
    for r in rows:
        head = f"| {r.model} | {r.seq_len} | {r.layout} | {r.precision} "
        if r.step_time_s is None:
            lines.append(head + f"| n/a ({r.error}) |" + " |" * 11)
            continue
        lo, hi = r.step_range_s
        lines.append(head + f"| {r.step_time_s:.2f} | {lo:.2f}-{hi:.2f} | {r.tokens_per_s:,.0f} "
                     f"| {r.tflops_per_rank:.4f} | {r.peak_tflops:.4f} | **{r.mfu:.1%}** "
                     f"| {r.comm_exposed_frac:.1%} | {r.mem_peak_gib:.2f} "
                     f"| {r.loss_first:.3f} -> {r.loss_last:.3f} |")
    return "\n".join(lines)


def verdict(rows: list[Row]) -> list[str]:
    out = []
    for precision in PRECISIONS:
        got = [r for r in rows if r.precision == precision and r.mfu is not None]
        if not got:
            continue
        best = max(got, key=lambda r: r.mfu)
        at = best.seq_len
        judged = (("met" if best.mfu >= TARGET_MFU else "NOT met") if at == TARGET_LENGTH
                  else f"not judged, T={TARGET_LENGTH} is not in this run")
        others = ", ".join(f"{r.layout} {r.mfu:.1%}" for r in got if r is not best)
        out.append(f"{precision}: best MFU {best.mfu:.1%} ({best.model}, {best.layout}, "
                   f"T={at}) of the GEMM peak measured in this run "
                   f"({best.peak_tflops:.3f} TFLOP/s/rank); target >= {TARGET_MFU:.0%} at "
                   f"T={TARGET_LENGTH}: {judged}" + (f"; {others}" if others else ""))
    return out or ["no row ran"]


def plot(rows: list[Row], path: str) -> None:
    """MFU and tokens/s per (model, layout), fp32 and bf16 side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in rows if r.mfu is not None]
    keys = list(dict.fromkeys((r.model, r.layout, r.seq_len) for r in ran))
    precisions = [p for p in PRECISIONS if any(r.precision == p for r in ran)]
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(precisions))
    for i, precision in enumerate(precisions):
        got = {(r.model, r.layout, r.seq_len): r for r in ran if r.precision == precision}
        xs = [j + i * width for j, key in enumerate(keys) if key in got]
        ax_m.bar(xs, [got[k].mfu * 100 for k in keys if k in got], width, label=precision)
        ax_t.bar(xs, [got[k].tokens_per_s for k in keys if k in got], width, label=precision)
    ticks = [j + width * (len(precisions) - 1) / 2 for j in range(len(keys))]
    labels = [f"{m} T={n}\n{layout}" for m, layout, n in keys]
    for ax, what in ((ax_m, "MFU (% of the GEMM peak measured in the run)"),
                     (ax_t, "training tokens/s (2 ranks)")):
        ax.set_xticks(ticks, labels, fontsize=8)
        ax.set_ylabel(what)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
    ax_m.axhline(TARGET_MFU * 100, color="k", linestyle="--", linewidth=1)
    fig.suptitle(f"end-to-end training, {machine()}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def section(rows: list[Row], kernels: str, *, command: str, warmup: int, steps: int,
            plot_rel: Optional[str] = None) -> str:
    intro = (f"Measured {datetime.date.today().isoformat()} on {machine()}; {WORLD} gloo "
             f"processes x 1 thread; {warmup} warm-up step(s), median of {steps} step(s).")
    ceiling = ("The kernels on one thread, same run (attention is most of a long sequence's "
               "FLOPs, so the SDPA kernel's rate bounds MFU):\n\n" + kernels)
    body = join_section([intro, f"```\n{command}\n```", table(rows), ceiling], verdict(rows),
                        METHOD)
    if plot_rel:
        body += f"\n\n![end-to-end MFU and tokens/s]({plot_rel})"
    return body


def main(argv: Optional[list[str]] = None) -> list[Row]:
    p = argument_parser(__doc__, METHOD)
    p.add_argument("--seq-len", type=int, default=TARGET_LENGTH,
                   help="tokens per sequence (a multiple of 2 * CP = 4)")
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated model presets (conf/longtrain_conf/model), each optionally with "
                        "its own layouts: tiny,125m:ring+dense (default: --layouts)")
    p.add_argument("--layouts", default=",".join(b for _, b, _ in LAYOUTS),
                   help=f"comma-separated subset of {','.join(b for _, b, _ in LAYOUTS)}")
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="measured steps per row")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: T={QUICK_LENGTH}, 1 warm-up and 1 measured step")
    add_output_args(p)
    p.add_argument("--plot", default=None, help="PNG path for the MFU / tokens/s plot")
    args = p.parse_args(argv)
    seq_len = QUICK_LENGTH if args.quick else args.seq_len
    warmup, steps = (1, 1) if args.quick else (args.warmup, args.steps)
    names = {b for _, b, _ in LAYOUTS}
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    models = []
    for spec in (x.strip() for x in args.models.split(",") if x.strip()):
        name, _, own = spec.partition(":")
        models.append((name, own.split("+") if own else layouts))
    problems = []
    if bad := sorted(({x for _, ls in models for x in ls} | set(layouts)) - names):
        problems.append(f"--layouts / --models have layouts {bad}; choose from {sorted(names)}")
    if bad := [x for x in precisions if x not in PRECISIONS]:
        problems.append(f"--precisions has {bad}; choose from {list(PRECISIONS)}")
    if seq_len % 4:
        problems.append(f"--seq-len={seq_len} is not a multiple of 2 * CP = 4")
    if warmup < 0 or steps < 1:
        problems.append(f"--warmup={warmup} must be >= 0 and --steps={steps} >= 1")
    if problems:
        p.error("; ".join(problems))

    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    with tempfile.TemporaryDirectory() as tmp:
        shape = make_config(models[0][0], "dense", 1, "fp32", seq_len, 1, tmp).model
    head_dim = shape.head_dim or shape.hidden_size // shape.num_heads
    rates = [kernel_rates(p, seq_len, shape.num_heads, head_dim) for p in precisions]
    kernels = kernel_table(rates, shape.num_heads, head_dim)
    rows = []
    for model, model_layouts in models:
        for precision in precisions:
            for label, backend, cp in LAYOUTS:
                if backend not in model_layouts:
                    continue
                row = measure(model, label, backend, cp, precision, seq_len, warmup=warmup,
                              steps=steps)
                print(f"  {model} {label} {precision}: "
                      + (f"{row.step_time_s:.2f} s/step, MFU {row.mfu:.1%}"
                         if row.error is None else f"n/a ({row.error})"), flush=True)
                rows.append(row)
    print(f"# {machine()}")
    print(table(rows))
    print(kernels)
    for line in verdict(rows):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows], "kernels": rates}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    if args.out:
        plot_rel = (os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.out)))
                    if args.plot else None)
        replace_section(args.out, "e2e", TITLE,
                        section(rows, kernels, command=command_line("benchmarks.e2e", argv),
                                warmup=warmup, steps=steps, plot_rel=plot_rel))
        print(f"section written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
