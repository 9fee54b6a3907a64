"""The cost model (longtrain.planning.costmodel) fitted to this machine, checked against
collectives and CP=2 attention measured in the same run, then used to predict step times and
recommend a layout on a described cluster.

    python -m benchmarks.costmodel [--quick] [--cluster h100-8x8-ib400] [--out BENCHMARKS.md]

How the fit, the check and the prediction work is `METHOD` below, which also goes into
BENCHMARKS.md with the tables.
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from benchmarks.attention import _reason, _timed, attention_step, machine, run_in_world
from benchmarks.report import (add_output_args, argument_parser, command_line, compose_config,
                               publish)

TITLE = "Cost model: fitted here, checked against measured CP=2 attention, predicting a cluster"
SIZES = (2**14, 2**16, 2**18, 2**20, 2**22, 2**24)
QUICK_SIZES = (2**14, 2**18, 2**22)
LENGTHS = (4096, 8192, 16384)
QUICK_LENGTHS = (1024, 2048)
HEADS, HEAD_DIM = 8, 64
CHECKED = ("ring", "ulysses", "lasp2")
COLLECTIVES = ("all_gather", "all_to_all")
# the cluster tables: (model preset, sequence length, global batch in sequences)
WORKLOADS = (("8b", 131072, 8), ("8b", 1048576, 8))
# the layouts each workload's table shows (tp, cp, attention), besides the recommended ones
LAYOUTS = ((8, 8, "ring"), (8, 8, "ulysses"), (8, 8, "allgather"), (4, 16, "ring"),
           (4, 16, "ulysses_ring"), (8, 4, "ring"), (2, 32, "ring"), (1, 8, "ulysses"),
           (1, 8, "ring"), (2, 4, "ulysses"), (2, 4, "ring"))

METHOD = """\
- **Model** (`longtrain/planning/costmodel.py`, whose docstring has the equations): step time
  = compute + exposed communication. Compute = a rank's matmul FLOPs / (peak x GEMM
  efficiency) + its attention FLOPs / (peak x attention efficiency; linear layers: the linear
  attention efficiency), FLOPs from `longtrain.observability.flops` (zigzag gives each CP rank
  1/c of the causal work; allgather's applied mask computes all T/c x T pairs). A message
  costs latency + bytes / bandwidth; collectives are ring algorithms (all-reduce 2(c-1) steps
  of n/c, all-gather (c-1) steps of a rank's part, all-to-all (c-1) steps of n/c). Ring
  attention: each of the c-1 K/V hops forward and backward is exposed only by what exceeds
  one block's compute (backward blocks: 2x), so the rotation hides when a block's compute is
  longer than its hop; the c dK/dV hops of the backward are exposed whole (ring.py waits for
  them before the next block). Ulysses: 8 all-to-alls (q, k, v, out; dout, dq, dk, dv), not
  overlapped; allgather: K/V all-gathered, dK/dV all-reduced; LASP-2: an all-gather of the
  chunk states forward and backward; LASP-1 the c-1 chained state hops; TP: 4 all-reduces of
  the activations per layer; DP: the gradient all-reduce over CP x DP after the backward, in
  the parameters' dtype. Memory policies: the planner's recompute factor on compute;
  offloading moves the saved activations over the host link, exposed beyond the forward /
  backward compute. Links: a group inside a node uses NVLink, one spanning nodes the NIC.
- **Fit** (2 gloo processes x 1 thread, this machine): the link from a ring hop (both ranks
  send n bytes to each other with `batch_isend_irecv`, as ring attention does) at several n,
  median of the reps, least squares of time = latency + n / bandwidth weighted by 1 / time^2
  (relative errors, so the small messages set the latency); the GEMM peak
  (`measure_gemm_tflops`, 1 thread); the attention rate from causal SDPA fwd+bwd (what
  `get_attention("dense")` runs) and the linear-attention rate from the lightning kernel
  fwd+bwd, each on one thread of each rank at the same time, at the lengths a CP=2 rank
  sees, counted with the model's FLOP convention (fwd+bwd = 3x forward); efficiency = rate /
  GEMM peak. These values are the `cpu-local` preset.
- **Check**: all-gather and all-to-all at several sizes, and ring, ulysses
  (`benchmarks.attention.attention_step`, the harness of the attention section) and lasp2
  (`benchmarks.lasp`'s step) fwd+bwd at CP=2, timed in the same world (median of the reps, a
  rep = the slowest rank), against the fitted model's prediction for the same shape; error =
  predicted / measured - 1. Nothing is fitted to these rows.
- **Prediction**: the cluster preset (`cluster=` group), the 8B model (`model=8b`, bf16,
  batch 8 sequences) at each length: the listed layouts and the recommended ones
  (`costmodel.recommend`: every tp within a node dividing the heads, every cp and CP backend
  `longtrain.planning.validate` accepts, under the memory policy that fits 80 GiB
  (`longtrain.memory.estimate`) and is fastest), fastest first; `longtrain-train --check
  cluster=...` prints the same for a run.
"""


@dataclass
class Fit:
    latency_s: float
    gbytes_per_s: float
    gemm_tflops: float
    attn_tflops: float
    linear_tflops: float
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


@dataclass
class CollectiveCheck:
    op: str
    nbytes: int
    measured_s: float
    predicted_s: float = 0.0


@dataclass
class LayoutRow:
    model: str
    length: int
    layout: str
    overrides: str
    step_s: Optional[float] = None
    compute_s: float = 0.0
    comm: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    ring_hidden: Optional[bool] = None
    memory: str = ""
    memory_gib: float = 0.0
    # the fastest recommended layout (recommend's first)
    recommended: bool = False
    # its place among the 3 recommended (1-3), None when not recommended
    rank: Optional[int] = None
    # why the layout cannot run (validation, or no memory policy fits)
    why: Optional[str] = None


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    """Median over `reps` (after a warm-up) of the slowest rank's seconds for `fn`."""
    times = []
    for i in range(reps + 1):
        dist.barrier()
        start = time.perf_counter()
        fn()
        seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        if i:
            times.append(float(seconds))
    return statistics.median(times)


def _exchange(n: int) -> Callable[[], None]:
    """One ring hop of n bytes: both ranks send to each other."""
    peer = 1 - dist.get_rank()
    send, recv = torch.ones(n // 4), torch.empty(n // 4)

    def hop() -> None:
        ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()

    return hop


def _collective(op: str, n: int) -> Callable[[], None]:
    """all_gather: each rank contributes n bytes; all_to_all: each rank holds n bytes."""
    world = dist.get_world_size()
    x = torch.ones(n // 4)
    if op == "all_gather":
        out = [torch.empty_like(x) for _ in range(world)]
        return lambda: dist.all_gather(out, x)
    out = torch.empty_like(x)
    return lambda: dist.all_to_all_single(out, x)


def _rate(lengths: list[int], reps: int, step: Callable[[int], Callable[[], None]],
          flops: Callable[[int], float]) -> float:
    """TFLOP/s of `step(n)` (fwd+bwd) on this thread, least squares over the lengths."""
    from longtrain.planning.cluster import fit_line

    samples = []
    for n in lengths:
        fn = step(n)
        best = float("inf")
        for i in range(reps + 1):
            start = time.perf_counter()
            fn()
            if i:
                best = min(best, time.perf_counter() - start)
        samples.append((flops(n), best))
    # t = flops / rate through the origin: the slope of the line with 0 and (flops, t)
    _, per_flop = fit_line([0.0] + [f for f, _ in samples], [0.0] + [t for _, t in samples])
    return 1.0 / per_flop / 1e12


def _sdpa(n: int) -> Callable[[], None]:
    import torch.nn.functional as F

    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, HEADS, n, HEAD_DIM)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout)


def _lightning(n: int) -> Callable[[], None]:
    from longtrain.attention.base import AttentionContext, AttentionMeta
    from longtrain.attention.linear import head_log_decay, linear_attention

    attn, decay = linear_attention("lasp2"), head_log_decay(HEADS, "slopes")
    q, k = (torch.nn.functional.silu(torch.randn(1, n, HEADS, HEAD_DIM)) for _ in range(2))
    v, dout = torch.randn(1, n, HEADS, HEAD_DIM), torch.randn(1, n, HEADS, HEAD_DIM)

    def step() -> None:
        ins = [x.detach().requires_grad_() for x in (q, k, v)]
        attn(*ins, decay, AttentionMeta(), AttentionContext()).backward(dout)

    return step


def _check_step(runtime: Any, backend: str, n: int) -> Callable[[], None]:
    from benchmarks.lasp import _lasp_step
    from longtrain.attention.base import AttentionMeta, get_attention

    gen = torch.Generator().manual_seed(n)
    qkvd = [torch.randn(1, n, HEADS, HEAD_DIM, generator=gen) for _ in range(4)]
    if backend == "lasp2":
        # the model's non-negative feature map on q and k, as benchmarks.lasp
        qkvd[0], qkvd[1] = (torch.nn.functional.silu(x) for x in qkvd[:2])
        return _lasp_step(runtime, "lasp2", qkvd, HEADS)
    return attention_step(get_attention(backend), runtime, qkvd, AttentionMeta(causal=True),
                          alone=False)


def _worker(runtime: Any, sizes: list[int], lengths: list[int], reps: int, path: str) -> None:
    from longtrain.observability.flops import causal_pairs, layer_attention_forward
    from longtrain.observability.resources import measure_gemm_tflops

    samples = [(n, _median_time(_exchange(n), reps)) for n in sizes]
    collectives = [(op, n, _median_time(_collective(op, n), reps))
                   for op in COLLECTIVES for n in sizes]
    gemm = measure_gemm_tflops(torch.device("cpu"), torch.float32)
    # the shares of a CP=2 rank: T/2 tokens of queries against up to T keys
    shares = sorted({n // 2 for n in lengths} | {min(lengths)})
    attn = _rate(shares, reps, _sdpa, lambda n: 3 * 4.0 * HEAD_DIM * HEADS * causal_pairs(n))
    linear = _rate(shares, reps, _lightning,
                   lambda n: 3 * layer_attention_forward("linear", t=n, heads=HEADS,
                                                         head_dim=HEAD_DIM))
    rows = []
    for n in lengths:
        for backend in CHECKED:
            error, times = None, []
            try:
                step = _check_step(runtime, backend, n)
                step()
                times = [_timed(step)[0] for _ in range(reps)]
            except Exception as exc:  # noqa: BLE001 - reported as a table row
                error = _reason(exc)
            rows.append({"length": n, "backend": backend, "error": error,
                         "measured_s": statistics.median(times) if times else None})
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump({"samples": samples, "collectives": collectives, "gemm": gemm,
                       "attn": attn, "linear": linear, "rows": rows}, f)


def fit_link(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """(latency s, GB/s) by least squares of time = latency + bytes / bandwidth, weighted by
    1 / time^2 (relative errors)."""
    from longtrain.planning.cluster import fit_line

    latency, per_byte = fit_line([float(n) for n, _ in samples], [t for _, t in samples],
                                 weights=[1.0 / t ** 2 for _, t in samples])
    return max(latency, 0.0), 1.0 / per_byte / 1e9


def local_cluster(fit: Fit) -> Any:
    """The fitted machine as a Cluster (what the `cpu-local` preset records)."""
    from longtrain.parallel.collective_cost import Link
    from longtrain.planning.cluster import PRESETS

    link = Link(fit.gbytes_per_s, fit.latency_s)
    base = PRESETS["cpu-local"]
    return type(base)("cpu-local (fitted)", nodes=1, devices_per_node=2,
                      peak_tflops=fit.gemm_tflops, gemm_eff=1.0,
                      attn_eff=fit.attn_tflops / fit.gemm_tflops,
                      linear_eff=fit.linear_tflops / fit.gemm_tflops, intra=link, inter=link,
                      memory_gib=base.memory_gib)


def check_rows(got: dict[str, Any], fit: Fit) -> list[Check]:
    from longtrain.parallel.collective_cost import AttentionShape
    from longtrain.planning.costmodel import attention_op, linear_op

    cluster = local_cluster(fit)
    out = []
    for r in got["rows"]:
        shape = AttentionShape(r["length"], 1, HEADS, HEADS, HEAD_DIM, 4)
        if r["backend"] == "lasp2":
            (compute, exposed), detail = linear_op("lasp2", shape, c=2, cluster=cluster), None
        else:
            compute, exposed, detail = attention_op(r["backend"], shape, c=2, cluster=cluster)
        out.append(Check(r["length"], r["backend"], r["measured_s"], compute, exposed,
                         None if detail is None else detail.hidden, r["error"]))
    return out


def collective_rows(got: dict[str, Any], fit: Fit) -> list[CollectiveCheck]:
    from longtrain.parallel.collective_cost import Link, all_gather, all_to_all

    link = Link(fit.gbytes_per_s, fit.latency_s)
    model = {"all_gather": all_gather, "all_to_all": all_to_all}
    return [CollectiveCheck(op, int(n), float(t), model[op](n, 2, link))
            for op, n, t in got["collectives"]]


def _layout_row(cand: Any, model: str, length: int, cluster: Any, why: Optional[str]
                ) -> LayoutRow:
    from longtrain.planning.costmodel import describe_layout, layout_overrides
    from longtrain.planning.search import fastest_fitting

    row = LayoutRow(model, length, describe_layout(cand), layout_overrides(cand), why=why)
    if why is not None:
        return row
    p = fastest_fitting(cand, cluster)
    if p is None:
        row.why = "no memory policy fits"
        return row
    row.layout, row.overrides, row.step_s, row.compute_s = p.layout, p.overrides, p.step_s, \
        p.compute_s
    row.comm, row.tokens_per_s, row.mfu, row.ring_hidden = dict(p.comm_s), p.tokens_per_s, \
        p.mfu, p.ring_hidden
    row.memory, row.memory_gib = p.memory_policy, p.memory_gib or 0.0
    return row


def cluster_rows(cluster_name: str, workloads: list[tuple[str, int, int]]) -> list[LayoutRow]:
    """Each workload's listed layouts and the 3 recommended ones, predicted; fastest first,
    the layouts that cannot run last."""
    import copy

    from longtrain.planning.validate import problems
    from longtrain.planning.cluster import PRESETS
    from longtrain.planning.search import recommend

    cluster = PRESETS[cluster_name]
    out = []
    for model, length, batch in workloads:
        base = compose_config([f"model={model}", f"data.seq_len={length}",
                               f"data.batch_size={batch}", "train.precision=bf16",
                               f"parallel.world_size={cluster.devices}", "parallel.tp=8",
                               "parallel.cp=8", "attention=ring", f"cluster={cluster_name}",
                               "output_dir=/tmp"])
        best = recommend(base, cluster, top=3)
        rows: dict[str, LayoutRow] = {}
        for tp, cp, backend in LAYOUTS:
            cand = copy.deepcopy(base)
            cand.parallel.tp, cand.parallel.cp, cand.attention.backend = tp, cp, backend
            found = problems(cand)
            row = _layout_row(cand, model, length, cluster, found[0] if found else None)
            rows[row.layout] = row
        for rank, p in enumerate(best, 1):
            # a listed layout that fits only fully sharded (recommend tries optim.zero=3)
            # shows the sharded prediction
            if p.layout not in rows or rows[p.layout].step_s is None:
                rows[p.layout] = LayoutRow(model, length, p.layout, p.overrides, p.step_s,
                                           p.compute_s, dict(p.comm_s), p.tokens_per_s, p.mfu,
                                           p.ring_hidden, p.memory_policy, p.memory_gib or 0.0)
            rows[p.layout].rank, rows[p.layout].recommended = rank, rank == 1
        out += sorted(rows.values(), key=lambda r: (r.step_s is None, r.step_s or 0.0))
    return out


def fit_table(fit: Fit) -> str:
    from longtrain.parallel.collective_cost import Link

    lines = ["| fitted | value |", "|---|---|",
             f"| link latency (ring hop, gloo) | {fit.latency_s * 1e6:.0f} us |",
             f"| link bandwidth (one direction) | {fit.gbytes_per_s:.2f} GB/s |",
             f"| GEMM peak, 1 thread, fp32 | {fit.gemm_tflops:.4f} TFLOP/s |",
             f"| causal attention fwd+bwd, 1 thread | {fit.attn_tflops:.4f} TFLOP/s "
             f"({fit.attn_tflops / fit.gemm_tflops:.0%} of GEMM) |",
             f"| lightning attention fwd+bwd, 1 thread | {fit.linear_tflops:.4f} TFLOP/s "
             f"({fit.linear_tflops / fit.gemm_tflops:.0%} of GEMM) |"]
    link = Link(fit.gbytes_per_s, fit.latency_s)
    lines += ["", "| hop bytes | measured ms | fitted ms |", "|---|---|---|"]
    lines += [f"| {n:,} | {t * 1e3:.3f} | {link.time(n) * 1e3:.3f} |" for n, t in fit.samples]
    return "\n".join(lines)


def preset_line(fit: Fit) -> str:
    """The fit as longtrain.planning.costmodel.CPU_FIT (the cpu-local preset)."""
    return (f'CPU_FIT = {{"peak_tflops": {fit.gemm_tflops:.3g}, "attn_eff": '
            f'{fit.attn_tflops / fit.gemm_tflops:.2f}, "linear_eff": '
            f'{fit.linear_tflops / fit.gemm_tflops:.2f}, "gbytes_per_s": '
            f'{fit.gbytes_per_s:.2f}, "latency_s": {fit.latency_s:.1e}, ...}}')


def collective_table(rows: list[CollectiveCheck]) -> str:
    lines = ["| collective, 2 ranks | bytes per rank | measured ms | predicted ms | error |",
             "|---|---|---|---|---|"]
    lines += [f"| {r.op} | {r.nbytes:,} | {r.measured_s * 1e3:.3f} | {r.predicted_s * 1e3:.3f} "
              f"| {r.predicted_s / r.measured_s - 1:+.0%} |" for r in rows]
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


def cluster_table(rows: list[LayoutRow]) -> str:
    lines = ["| model | T | layout | step s | compute s | exposed tp / cp / dp / offload s "
             "| tokens/s | MFU | ring hidden | memory policy (GiB) |", "|" + "---|" * 10]
    for r in rows:
        t = f"{r.length // 1024}K"
        if r.step_s is None:
            lines.append(f"| {r.model} | {t} | {r.layout} | cannot run: {r.why} | | | | | | |")
            continue
        hidden = "-" if r.ring_hidden is None else ("yes" if r.ring_hidden else "no")
        mark = f" **(recommended #{r.rank})**" if r.rank else ""
        comm = " / ".join(f"{r.comm.get(k, 0.0):.3f}" for k in ("tp", "cp", "dp", "offload"))
        lines.append(f"| {r.model} | {t} | {r.layout}{mark} | {r.step_s:.2f} | {r.compute_s:.2f} "
                     f"| {comm} | {r.tokens_per_s:,.0f} | {r.mfu:.1%} | {hidden} "
                     f"| {r.memory} ({r.memory_gib:.0f}) |")
    return "\n".join(lines)


def verdict(checks: list[Check], collectives: list[CollectiveCheck], rows: list[LayoutRow],
            cluster: str) -> list[str]:
    out = []
    errs = [abs(c.predicted_s / c.measured_s - 1) for c in checks if c.measured_s]
    if errs:
        out.append(f"Model vs measured CP=2 attention (ring, ulysses, lasp2) on this machine: "
                   f"mean |error| {statistics.mean(errs):.0%}, worst {max(errs):.0%} over "
                   f"{len(errs)} rows")
    big = [r for r in collectives if r.nbytes >= 2**20]
    if big:
        errs = [abs(r.predicted_s / r.measured_s - 1) for r in big]
        out.append(f"Collective formulas with the fitted link, messages >= 1 MiB: mean |error| "
                   f"{statistics.mean(errs):.0%}, worst {max(errs):.0%}")
    for model, length in sorted({(r.model, r.length) for r in rows}):
        rec = [r for r in rows if r.model == model and r.length == length and r.recommended]
        if rec:
            r = rec[0]
            out.append(f"{cluster}, {model} at {length // 1024}K tokens: recommended "
                       f"`{r.overrides}`, predicted {r.step_s:.2f} s/step, "
                       f"{r.tokens_per_s:,.0f} tokens/s, MFU {r.mfu:.1%}")
        else:
            out.append(f"{cluster}, {model} at {length // 1024}K tokens: no layout fits")
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    from longtrain.planning.cluster import PRESETS

    p = argument_parser(__doc__, METHOD)
    p.add_argument("--cluster", default="h100-8x8-ib400",
                   choices=sorted(k for k in PRESETS if k != "cpu-local"))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: lengths {QUICK_LENGTHS}, fewer sizes, 1 rep")
    add_output_args(p)
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error(f"--reps={args.reps} must be >= 1")
    lengths = list(QUICK_LENGTHS if args.quick else LENGTHS)
    sizes = list(QUICK_SIZES if args.quick else SIZES)
    reps = 1 if args.quick else args.reps

    got, why = run_in_world(_worker, (sizes, lengths, reps), cp=2)
    if why is not None:
        raise SystemExit(f"benchmarks.costmodel: the measuring world failed: {why}")
    samples = [(int(n), float(t)) for n, t in got["samples"]]
    latency, gbps = fit_link(samples)
    fit = Fit(latency, gbps, got["gemm"], got["attn"], got["linear"], samples)
    checks = check_rows(got, fit)
    collectives = collective_rows(got, fit)
    rows = cluster_rows(args.cluster, list(WORKLOADS))

    parts = [f"Measured {datetime.date.today().isoformat()} on {machine()}; 2 gloo processes x "
             f"1 thread; {HEADS} heads x {HEAD_DIM}, fp32, median of {reps} rep"
             f"{'s' if reps > 1 else ''}.",
             f"```\n{command_line('benchmarks.costmodel', argv)}\n```",
             "Fit (the `cpu-local` preset):\n\n" + fit_table(fit)
             + f"\n\n`{preset_line(fit)}`",
             "Check (fitted model vs measured, same run):\n\n" + collective_table(collectives)
             + "\n\n" + check_table(checks),
             f"Prediction for `{args.cluster}` (8B, bf16, batch 8 sequences; the listed "
             f"layouts and the 3 recommended, fastest first):\n\n" + cluster_table(rows)]
    lines = verdict(checks, collectives, rows, args.cluster)
    print(f"# {machine()}")
    result = {"fit": asdict(fit),
              "collectives": [asdict(c) for c in collectives],
              "checks": [asdict(c) | {"predicted_s": c.predicted_s} for c in checks],
              "cluster": [asdict(r) for r in rows]}
    publish(result, parts=parts, lines=lines, method=METHOD, key="costmodel", title=TITLE,
            out=args.out, json_path=args.json, shown=2)
    return result


if __name__ == "__main__":
    main()
