"""The cost model (longtrain.parallel.costmodel) fitted to this machine, checked against CP=2
attention measured in the same run, then used to predict step times on a described cluster.

    python -m benchmarks.costmodel [--quick] [--cluster h100-8x8-ib400] [--out BENCHMARKS.md]

How the fit, the check and the prediction work is `METHOD` below, which also goes into
BENCHMARKS.md with the tables.
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from benchmarks.attention import _reason, _timed, attention_step, machine, run_in_world
from benchmarks.report import (add_output_args, argument_parser, command_line, compose_config,
                               join_section, replace_section)

TITLE = "Cost model: fitted here, checked against measured CP=2 attention, predicting a cluster"
SIZES = (2**16, 2**18, 2**20, 2**22, 2**24)
QUICK_SIZES = (2**16, 2**20, 2**22)
LENGTHS = (4096, 8192, 16384)
QUICK_LENGTHS = (1024, 2048)
HEADS, HEAD_DIM = 8, 64
CHECKED = ("ring", "ulysses")
# the cluster tables: (model preset, sequence length) x every valid layout of the cluster
WORKLOADS = (("8b", 131072), ("8b", 1048576))

METHOD = """\
- **Model** (`longtrain/parallel/costmodel.py`, whose docstring has the equations): step time
  = compute + exposed communication. Compute = a rank's matmul FLOPs / (peak x GEMM
  efficiency) + its attention FLOPs / (peak x attention efficiency), FLOPs from
  `longtrain.observability.flops` (zigzag gives each CP rank 1/c of the causal work). A
  message costs latency + bytes / bandwidth; collectives are ring algorithms. Ring attention:
  each of the c-1 K/V hops forward (c-1 K/V + dK/dV hops backward, then dK/dV home) is exposed
  only by what exceeds one block's compute, so communication hides when a block's compute is
  longer than its hop; Ulysses: 8 all-to-alls (q, k, v, out; dout, dq, dk, dv), not
  overlapped; LASP-2: an all-gather of the chunk states forward and backward; LASP-1 the c-1
  chained state hops; TP: 4 all-reduces of the activations per layer; DP: the fp32 gradient
  all-reduce over CP x DP after the backward. Links: a group inside a node uses NVLink, one
  spanning nodes the NIC.
- **Fit** (2 gloo processes x 1 thread, this machine): the link from a ring hop (both ranks
  send n bytes to each other with `batch_isend_irecv`, as ring attention does) at several n,
  median of the reps, least squares of time = latency + n / bandwidth; the GEMM peak
  (`measure_gemm_tflops`, 1 thread); the attention rate from causal SDPA fwd+bwd on one
  thread at the lengths a CP=2 rank sees, counted with the model's FLOP convention (fwd+bwd
  = 3x forward), so attention efficiency = that rate / GEMM peak.
- **Check**: ring and ulysses fwd+bwd at CP=2 (ours, `benchmarks.attention.attention_step`, the
  same harness as the attention section) timed in the same world, against the fitted model's
  prediction for the same shape; error = predicted / measured - 1.
- **Prediction**: the cluster preset (`cluster.preset`), each valid layout (tp within a node,
  the CP backends the model allows; `longtrain.config.validate` refuses the rest) whose memory
  estimate (`longtrain.memory.planner`, the cheapest policy that fits 80 GiB) fits, fastest
  first; `longtrain-train --check cluster.preset=...` prints the same for a run.
"""


@dataclass
class Fit:
    latency_s: float
    gbytes_per_s: float
    gemm_tflops: float
    attn_tflops: float
    samples: list[tuple[int, float]]


@dataclass
class Check:
    length: int
    backend: str
    measured_s: Optional[float]
    compute_s: float = 0.0
    exposed_s: float = 0.0
    hidden: Optional[bool] = None
    error: Optional[str] = None

    @property
    def predicted_s(self) -> float:
        return self.compute_s + self.exposed_s


def _exchange_time(n: int, reps: int) -> float:
    """Median seconds of one ring hop of n bytes (both ranks send to each other)."""
    peer = 1 - dist.get_rank()
    send = torch.ones(n // 4)
    recv = torch.empty(n // 4)
    times = []
    for i in range(reps + 1):
        dist.barrier()
        start = time.perf_counter()
        ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        if i:
            times.append(float(seconds))
    return statistics.median(times)


def _attention_rate(lengths: list[int], reps: int) -> float:
    """Causal SDPA fwd+bwd TFLOP/s on this thread (the model's FLOP convention)."""
    import torch.nn.functional as F

    from longtrain.observability.flops import causal_pairs

    rates = []
    for n in lengths:
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, requires_grad=True) for _ in range(3))
        dout = torch.randn(1, HEADS, n, HEAD_DIM)
        best = float("inf")
        for i in range(reps + 1):
            start = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout)
            if i:
                best = min(best, time.perf_counter() - start)
        rates.append(3 * 4.0 * HEAD_DIM * HEADS * causal_pairs(n) / best / 1e12)
    return statistics.median(rates)


def _worker(runtime: Any, sizes: list[int], lengths: list[int], reps: int, path: str) -> None:
    from longtrain.attention.base import AttentionMeta, get_attention
    from longtrain.observability.resources import measure_gemm_tflops

    samples = [(n, _exchange_time(n, reps)) for n in sizes]
    gemm = measure_gemm_tflops(torch.device("cpu"), torch.float32)
    # the shares of a CP=2 rank: T/2 tokens of queries against up to T keys; SDPA at T/2 and T
    attn = _attention_rate(sorted({n // 2 for n in lengths} | {min(lengths)}), reps)
    rows = []
    for n in lengths:
        gen = torch.Generator().manual_seed(n)
        qkvd = [torch.randn(1, n, HEADS, HEAD_DIM, generator=gen) for _ in range(4)]
        for backend in CHECKED:
            error, times = None, []
            try:
                step = attention_step(get_attention(backend), runtime, qkvd,
                                      AttentionMeta(causal=True), alone=False)
                step()
                times = [_timed(step)[0] for _ in range(reps)]
            except Exception as exc:  # noqa: BLE001 - reported as a table row
                error = _reason(exc)
            rows.append({"length": n, "backend": backend, "error": error,
                         "measured_s": statistics.median(times) if times else None})
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump({"samples": samples, "gemm": gemm, "attn": attn, "rows": rows}, f)


def fit_link(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """(latency s, GB/s) by least squares of time = latency + bytes / bandwidth."""
    from longtrain.parallel.costmodel import fit_line

    latency, per_byte = fit_line([float(n) for n, _ in samples], [t for _, t in samples])
    return max(latency, 0.0), 1.0 / per_byte / 1e9


def local_cluster(fit: Fit) -> Any:
    from longtrain.parallel.costmodel import Cluster, Link

    link = Link(fit.gbytes_per_s, fit.latency_s)
    return Cluster("cpu-local (fitted)", nodes=1, devices_per_node=2,
                   peak_tflops=fit.gemm_tflops, gemm_eff=1.0,
                   attn_eff=fit.attn_tflops / fit.gemm_tflops, intra=link, inter=link,
                   memory_gib=8.0)


def check_rows(got: dict[str, Any], fit: Fit) -> list[Check]:
    from longtrain.parallel.costmodel import AttentionShape, attention_op

    cluster = local_cluster(fit)
    out = []
    for r in got["rows"]:
        shape = AttentionShape(r["length"], 1, HEADS, HEADS, HEAD_DIM, 4)
        compute, exposed, detail = attention_op(r["backend"], shape, c=2, cluster=cluster)
        out.append(Check(r["length"], r["backend"], r["measured_s"], compute, exposed,
                         None if detail is None else detail.hidden, r["error"]))
    return out


def cluster_rows(cluster_name: str, workloads: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """Every valid layout of each workload on the cluster, predicted; fastest first."""
    from longtrain.config.validate import problems
    from longtrain.memory.planner import GIB, estimates
    from longtrain.parallel.costmodel import (PRESETS, candidate_configs, predict,
                                              recommend)

    cluster = PRESETS[cluster_name]
    out = []
    for model, length in workloads:
        base = compose_config([f"model={model}", f"data.seq_len={length}", "data.batch_size=1",
                               "train.precision=bf16", f"parallel.world_size={cluster.devices}",
                               "parallel.tp=8", "parallel.cp=8", "attention=ring",
                               f"cluster.preset={cluster_name}", "output_dir=/tmp"])
        best = recommend(base, cluster, top=1)
        for cand in candidate_configs(base, cluster):
            if problems(cand):
                continue
            fits = [e for e in estimates(cand, on_gpu=True) if e.total <= cluster.memory_gib * GIB]
            e = min(fits or estimates(cand, on_gpu=True),
                    key=lambda e: (e.cost, e.policy.offload, e.total))
            p = predict(cand, cluster, cost=e.cost)
            out.append({"model": model, "length": length, "layout": p.layout,
                        "overrides": p.overrides, "step_s": p.step_s, "compute_s": p.compute_s,
                        **{f"{k}_s": v for k, v in p.comm_s.items()},
                        "tokens_per_s": p.tokens_per_s, "mfu": p.mfu,
                        "ring_hidden": p.ring_hidden, "fits": bool(fits),
                        "memory": e.policy.name, "memory_gib": e.total / GIB,
                        "recommended": bool(best) and best[0].overrides == p.overrides})
    out.sort(key=lambda r: (r["model"], r["length"], not r["fits"], r["step_s"]))
    return out


def fit_table(fit: Fit) -> str:
    lines = ["| fitted | value |", "|---|---|",
             f"| link latency (ring hop, gloo) | {fit.latency_s * 1e6:.0f} us |",
             f"| link bandwidth (one direction) | {fit.gbytes_per_s:.2f} GB/s |",
             f"| GEMM peak, 1 thread, fp32 | {fit.gemm_tflops:.3f} TFLOP/s |",
             f"| causal attention fwd+bwd, 1 thread | {fit.attn_tflops:.3f} TFLOP/s "
             f"({fit.attn_tflops / fit.gemm_tflops:.0%} of GEMM) |"]
    from longtrain.parallel.costmodel import Link

    link = Link(fit.gbytes_per_s, fit.latency_s)
    lines += ["", "| hop bytes | measured ms | fitted ms |", "|---|---|---|"]
    lines += [f"| {n:,} | {t * 1e3:.3f} | {link.time(n) * 1e3:.3f} |" for n, t in fit.samples]
    return "\n".join(lines)


def check_table(rows: list[Check]) -> str:
    lines = ["| T | backend CP=2 | measured s | predicted s | compute s | exposed comm s "
             "| ring hops hidden | error |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.measured_s is None:
            lines.append(f"| {r.length} | {r.backend} | n/a ({r.error}) | | | | | |")
            continue
        hidden = "-" if r.hidden is None else ("yes" if r.hidden else "no")
        lines.append(f"| {r.length} | {r.backend} | {r.measured_s:.3f} | {r.predicted_s:.3f} "
                     f"| {r.compute_s:.3f} | {r.exposed_s:.4f} | {hidden} "
                     f"| {r.predicted_s / r.measured_s - 1:+.0%} |")
    return "\n".join(lines)


def cluster_table(rows: list[dict[str, Any]], top: int) -> str:
    lines = ["| model | T | layout | step s | compute s | exposed tp / cp / dp s | tokens/s | MFU "
             "| ring hidden | memory policy (GiB) |", "|" + "---|" * 10]
    shown: dict[tuple[str, int], int] = {}
    for r in rows:
        key = (r["model"], r["length"])
        shown[key] = shown.get(key, 0) + 1
        if shown[key] > top:
            continue
        hidden = "-" if r["ring_hidden"] is None else ("yes" if r["ring_hidden"] else "no")
        mark = " **(recommended)**" if r["recommended"] else ""
        mem = f"{r['memory']} ({r['memory_gib']:.0f})" + ("" if r["fits"] else " does NOT fit")
        lines.append(f"| {r['model']} | {r['length'] // 1024}K | {r['layout']}{mark} "
                     f"| {r['step_s']:.2f} | {r['compute_s']:.2f} | {r['tp_s']:.3f} / "
                     f"{r['cp_s']:.3f} / {r['dp_s']:.3f} | {r['tokens_per_s']:,.0f} "
                     f"| {r['mfu']:.1%} | {hidden} | {mem} |")
    return "\n".join(lines)


def verdict(checks: list[Check], rows: list[dict[str, Any]], cluster: str) -> list[str]:
    errs = [abs(c.predicted_s / c.measured_s - 1) for c in checks if c.measured_s]
    out = []
    if errs:
        out.append(f"Model vs measured CP=2 attention on this machine: mean |error| "
                   f"{statistics.mean(errs):.0%}, worst {max(errs):.0%} over {len(errs)} rows")
    for model, length in sorted({(r["model"], r["length"]) for r in rows}):
        rec = [r for r in rows if r["model"] == model and r["length"] == length
               and r["recommended"]]
        if rec:
            r = rec[0]
            out.append(f"{cluster}, {model} at {length // 1024}K tokens: recommended "
                       f"`{r['overrides']}`, predicted {r['step_s']:.2f} s/step, "
                       f"{r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%}")
        else:
            out.append(f"{cluster}, {model} at {length // 1024}K tokens: no layout fits")
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    from longtrain.parallel.costmodel import PRESETS

    p = argument_parser(__doc__, METHOD)
    p.add_argument("--cluster", default="h100-8x8-ib400", choices=sorted(PRESETS))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--top", type=int, default=6, help="layouts shown per workload")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: lengths {QUICK_LENGTHS}, fewer sizes, 2 reps")
    add_output_args(p)
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error(f"--reps={args.reps} must be >= 1")
    lengths = list(QUICK_LENGTHS if args.quick else LENGTHS)
    sizes = list(QUICK_SIZES if args.quick else SIZES)
    reps = 2 if args.quick else args.reps

    got, why = run_in_world(_worker, (sizes, lengths, reps), cp=2)
    if why is not None:
        raise SystemExit(f"benchmarks.costmodel: the measuring world failed: {why}")
    samples = [(int(n), float(t)) for n, t in got["samples"]]
    latency, gbps = fit_link(samples)
    fit = Fit(latency, gbps, got["gemm"], got["attn"], samples)
    checks = check_rows(got, fit)
    rows = cluster_rows(args.cluster, list(WORKLOADS))

    parts = [f"Measured {datetime.date.today().isoformat()} on {machine()}; 2 gloo processes x "
             f"1 thread; {HEADS} heads x {HEAD_DIM}, fp32, median of {reps} reps.",
             f"```\n{command_line('benchmarks.costmodel', argv)}\n```",
             "Fit:\n\n" + fit_table(fit),
             "Check (fitted model vs measured, same run):\n\n" + check_table(checks),
             f"Prediction for `{args.cluster}` (bf16, batch 1 sequence, fastest first; "
             f"{args.top} per workload):\n\n" + cluster_table(rows, args.top)]
    lines = verdict(checks, rows, args.cluster)
    print(f"# {machine()}")
    for part in parts[2:]:
        print(part + "\n")
    for line in lines:
        print(line)
    result = {"fit": asdict(fit), "checks": [asdict(c) | {"predicted_s": c.predicted_s}
                                            for c in checks], "cluster": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.out:
        replace_section(args.out, "costmodel", TITLE, join_section(parts, lines, METHOD))
        print(f"section written to {args.out}")
    return result


if __name__ == "__main__":
    main()
