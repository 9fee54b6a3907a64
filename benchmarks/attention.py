"""Attention backends, ours and peer baselines (benchmarks/peers.py), side by side: causal
fwd+bwd time, tokens/s, peak memory and bytes sent per rank vs sequence length; prints a
table, writes a plot and a section of BENCHMARKS.md.

    python -m benchmarks.attention --lengths 4096,8192,16384 --heads 8 --head-dim 64 \
        --dtype fp32 --reps 3 --out BENCHMARKS.md --plot benchmarks/attention.png

Legend: B batch (1), T global sequence length, H heads (K/V as many), D head dim, c the CP
degree, T/c a CP rank's local length. How each figure is measured is `METHOD` below, which
also goes into BENCHMARKS.md with the table.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from benchmarks.peers import PEERS, NotApplicable, peer_step
from benchmarks.report import argument_parser, command_line, replace_section
from longtrain.observability.resources import reset_peak_rss, status_kib

CP = 2
BACKENDS = ("dense", "ring", "ulysses", "plain_ring", "ds_ulysses", "torch_cp")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET_RATIO = 0.85
TARGET_LENGTH = 16384
TITLE = "Attention: causal fwd+bwd vs sequence length"
QUICK_LENGTHS = (1024, 2048)
# ours and the peer it is compared with in the verdict
VERSUS = (("ring", "plain_ring"), ("ulysses", "ds_ulysses"))
TORCH_CP_ON_CPU = ("on CPU: torch's context_parallel shards only the CUDA SDPA kernels "
                   "(flash/efficient/cuDNN)")

METHOD = """\
- **Backends**, measured in one run on the same inputs (seeded `randn`, `[B, T, H, D]`), in
  one world of 2 gloo processes: *dense* = rank 0 alone with 2 threads (every core) running
  `get_attention("dense")` (torch SDPA) on the whole sequence while rank 1 waits; *ring*,
  *ulysses* = ours, both ranks x 1 thread, `get_attention(name)` on the zigzag shards
  (`split_for_cp`) with `AttentionContext(cp_group, cp_size=2, cp_rank)`. Peers
  (`benchmarks/peers.py`), both ranks x 1 thread on contiguous shards (rank r holds tokens
  [r T/c, (r+1) T/c), no zigzag, so causal work is imbalanced: the last rank computes c
  blocks, the first one): *plain_ring* = ring attention as first written (like
  ring-flash-attention's basic `ring_flash_attn_func`, with plain torch math in place of
  flash kernels): a `torch.autograd.Function` whose forward attends local q to the K/V block
  held (`q @ k^T * scale`, materialized `[B, H, T/c, T/c]` fp32 scores, causal mask on the
  diagonal block, future blocks skipped), merges by LSE in fp32 and passes K/V on with
  `batch_isend_irecv` waited at once (no overlap with compute, which ring-flash-attention
  does have); its backward recomputes the probabilities from the saved out and LSE, rings K/V
  again with the fp32 dK/dV accumulators until they reach their owner. It declines (n/a)
  when one score matrix would exceed 2 GiB (`peers.MAX_SCORES_BYTES`; the backward holds
  two).
  *ds_ulysses* = DeepSpeed-Ulysses as shipped: `deepspeed.sequence.layer.DistributedAttention(
  local, cp_group, scatter_idx=2, gather_idx=1)` with DeepSpeed's contiguous split, `local` =
  `F.scaled_dot_product_attention(is_causal=True)` on the gathered sequence (transposed to
  `[B, H, T, D]` and back). *torch_cp* = torch's `context_parallel(mesh, buffers=[q, k, v,
  dout], buffer_seq_dims=[2, 2, 2, 2])` (DeviceMesh over the gloo CP group) around
  `F.scaled_dot_product_attention`; on CPU it is n/a: torch registers its CP rules only for
  the CUDA SDPA kernels (flash, efficient, cuDNN), the CPU flash kernel has none, forcing the
  math backend (`sdpa_kernel(MATH)`) fails on its plain-tensor causal mask mixed with
  DTensors, the efficient / cuDNN backends have no CPU kernel, and torch's flex-attention CP
  path has no CPU backward. A backend that raises is shown as n/a with its error and the run
  goes on without it.
- **Time**: one warm-up rep per backend, then the reps with the backends interleaved (dense,
  ring, ulysses, plain_ring, ds_ulysses, dense, ...) so that a change in the machine's load
  hits them alike; each rep starts after a barrier and counts as the slowest rank's time; the
  table shows the median, and *min-max* the fastest and slowest rep: other jobs on the
  machine only ever add time, so a wide range marks a disturbed row. torch_cp patches SDPA
  for the whole process while active, so its reps run after the others. tokens/s = T /
  time; *vs dense* = dense time / time at the same T (throughput ratio); the verdict also
  gives ours vs its peer (plain_ring time / ring time, ds_ulysses time / ulysses time) at its
  length.
- **Peak MiB/rank** is the attention working set: right before each timed rep every rank
  resets the kernel's peak-RSS counter (`5 > /proc/self/clear_refs` sets VmHWM to the current
  RSS) and takes the RSS as its baseline; the inputs (q/k/v/dout, or this rank's shards) are
  part of the baseline, and what the rep adds on top (outputs, LSE, saved copies, receive
  buffers, gradients, kernel scratch) is VmHWM minus the baseline. Largest rank, max over
  reps. glibc's mmap threshold is pinned at 64 KiB (`mallopt`) so every tensor is its own
  mapping, returned to the kernel when freed and counted when touched (so every large tensor
  is fresh, page-faulted memory, for all backends alike); one-off costs (imports, gloo
  buffers) fall in the warm-up. *mem vs dense* = this row / dense at the same T.
- **Sent MiB/rank** is analytic (from the algorithm, not counted on the wire; the peers'
  figures are checked against counted bytes in `tests/test_attention_peers.py`). Ring and
  plain_ring: forward c-1 K/V blocks, backward c-1 K/V blocks + c dK/dV blocks (float32
  accumulators), a block being `[T/c, H, D]` per tensor (plain_ring sends blocks the first
  rank never reads, as every ring without zigzag does). Ulysses and ds_ulysses: q, k, v, out
  all-to-alls forward and dout, dq, dk, dv backward, each sending (c-1)/c of a `[T/c, H, D]`
  tensor.
- **CP > cores** (`--memory-cp`): ring/ulysses again in a world of that many 1-thread
  processes (one warm-up and one timed rep), to see how memory per rank scales with CP; they
  share the cores, so their times (marked *) are not comparable.
"""


@dataclass(frozen=True)
class Problem:
    heads: int
    head_dim: int
    dtype: str
    reps: int
    causal: bool = True


@dataclass
class Row:
    length: int
    backend: str
    # processes the sequence is split over (dense: 1)
    cp: int
    # median fwd+bwd seconds over reps (slowest rank per rep); None when it did not run
    time_s: Optional[float] = None
    # fastest and slowest rep: how much the machine's load moved the figure
    time_range_s: Optional[tuple[float, float]] = None
    # attention working set per rank (max over ranks), MiB
    peak_mib: Optional[float] = None
    error: Optional[str] = None


def _pin_mmap_threshold(nbytes: int = 64 * 1024) -> None:
    # M_MMAP_THRESHOLD; a fixed value also turns off glibc's dynamic threshold, which would
    # otherwise keep freed tensors in the heap where the next config reuses them unseen.
    ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, NotApplicable):
        return str(exc)
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
    return text if len(text) <= 160 else text[:157] + "..."


@contextlib.contextmanager
def _fwd_bwd(runtime, backend: str, qkvd_bthd: list[torch.Tensor], causal: bool
             ) -> Iterator[Callable[[], None]]:
    """Yield a callable running one fwd+bwd of `backend` on this rank's part of the inputs."""
    if backend == "torch_cp":
        import torch.nn.functional as F
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor.experimental import context_parallel

        mesh = DeviceMesh.from_group(runtime.cp_group, "cpu")
        # torch's CP shards [B, H, T, D] buffers in place (head-tail load balancing); the
        # buffers must not require grad (resize_), so the leaves are made inside the context
        bufs = [x.transpose(1, 2).contiguous() for x in qkvd_bthd]
        with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2] * len(bufs)):
            def step() -> None:
                ins = [x.detach().requires_grad_() for x in bufs[:3]]
                try:
                    F.scaled_dot_product_attention(*ins, is_causal=causal).backward(bufs[3])
                except NotImplementedError as exc:
                    # the CPU kernel has no CP sharding rule (see METHOD): say so plainly
                    if "_for_cpu" in str(exc):
                        raise NotApplicable(TORCH_CP_ON_CPU) from exc
                    raise

            yield step
        return
    if backend in PEERS:
        yield peer_step(backend, runtime, qkvd_bthd, causal=causal)
        return

    from longtrain.attention.base import AttentionMeta, get_attention

    attn = get_attention(backend)
    yield attention_step(attn, runtime, qkvd_bthd, AttentionMeta(causal=causal),
                         alone=backend == "dense")


def attention_step(attn, runtime, qkvd_bthd: list[torch.Tensor], meta, *, alone: bool
                   ) -> Callable[[], None]:
    """A callable running one fwd+bwd of `attn` (an attention.base function): rank 0 alone
    with every core (`alone`; the other ranks get a no-op and wait at the next barrier), or
    every rank on its zigzag CP shard of q, k, v, dout [B, T, H, D]."""
    from longtrain.attention.base import AttentionContext
    from longtrain.parallel.layout import split_for_cp

    if alone:
        if runtime.cp_rank != 0:
            return lambda: None
        threads = torch.get_num_threads()
        q, k, v, dout = qkvd_bthd
        ctx = AttentionContext()

        def step() -> None:
            torch.set_num_threads(os.cpu_count() or 1)
            try:
                ins = [x.detach().requires_grad_() for x in (q, k, v)]
                attn(*ins, meta, ctx).backward(dout)
            finally:
                torch.set_num_threads(threads)

        return step
    cp, rank = runtime.dims.cp, runtime.cp_rank
    ctx = AttentionContext(cp_group=runtime.cp_group, cp_size=cp, cp_rank=rank)
    q, k, v, dout = (split_for_cp(x, cp_size=cp, cp_rank=rank, dim=1).contiguous()
                     for x in qkvd_bthd)

    def sharded() -> None:
        ins = [x.detach().requires_grad_() for x in (q, k, v)]
        attn(*ins, meta, ctx).backward(dout)

    return sharded


def _timed(step: Callable[[], None]) -> tuple[float, float]:
    """(seconds of the slowest rank, largest per-rank peak MiB) of one rep."""
    gc.collect()
    dist.barrier()
    base_kib = reset_peak_rss()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    stats = torch.tensor([seconds, (status_kib("VmHWM") - base_kib) / 1024], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    return float(stats[0]), float(stats[1])


def _agreed_error(exc: Optional[BaseException]) -> Optional[str]:
    """The first rank's failure, if any rank failed (every rank then drops the backend)."""
    gathered: list[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, None if exc is None else _reason(exc))
    return next((e for e in gathered if e is not None), None)


def _measure_length(runtime, backends: list[str], length: int, prob: Problem,
                    failed: dict[str, str]) -> list[Row]:
    """Rows of `backends` at `length`: the reps of the backends interleaved (dense, ring,
    ulysses, plain_ring, ds_ulysses, dense, ...) so a change in the machine's load hits them
    alike; torch_cp, which patches SDPA for the whole process, is measured on its own after
    them."""
    gen = torch.Generator().manual_seed(length)
    qkvd = [torch.randn(1, length, prob.heads, prob.head_dim, generator=gen).to(DTYPES[prob.dtype])
            for _ in range(4)]
    cp = runtime.dims.cp
    rows = {b: Row(length, b, 1 if b == "dense" else cp, error=failed.get(b)) for b in backends}
    times: dict[str, list[float]] = {b: [] for b in backends}
    peaks: dict[str, list[float]] = {b: [] for b in backends}
    groups = [[b for b in backends if b != "torch_cp"], [b for b in backends if b == "torch_cp"]]
    for group in groups:
        with contextlib.ExitStack() as stack:
            steps = {}
            for b in group:
                if b in failed:
                    continue
                error = None
                try:
                    steps[b] = stack.enter_context(_fwd_bwd(runtime, b, qkvd, prob.causal))
                    # warm-up: first-call costs (imports, gloo buffers) stay out of the figures
                    steps[b]()
                except Exception as exc:  # noqa: BLE001 - reported as a table row
                    error = exc
                why = _agreed_error(error)
                if why is not None:
                    failed[b] = rows[b].error = why
                    steps.pop(b, None)
            for _ in range(prob.reps):
                for b, step in steps.items():
                    seconds, peak = _timed(step)
                    times[b].append(seconds)
                    peaks[b].append(peak)
    for b, row in rows.items():
        if times[b]:
            row.time_s, row.peak_mib = statistics.median(times[b]), max(peaks[b])
            row.time_range_s = (min(times[b]), max(times[b]))
    return list(rows.values())


def _worker(runtime, backends: list[str], lengths: list[int], prob: Problem,
            result_path: str) -> None:
    _pin_mmap_threshold()
    failed: dict[str, str] = {}
    rows = []
    for length in lengths:
        rows += _measure_length(runtime, backends, length, prob, failed)
        if dist.get_rank() == 0:
            print(f"  T={length} done", flush=True)
    if dist.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump([asdict(r) for r in rows], f)


def run_in_world(worker, args: tuple, *, cp: int) -> tuple[Any, Optional[str]]:
    """Run `worker(runtime, *args, path)` in one world of `cp` gloo processes x 1 thread:
    (the JSON it wrote at `path`, None), or (None, why) when the world crashed."""
    from longtrain.parallel.spawn import run_distributed

    with tempfile.TemporaryDirectory(prefix="longtrain-bench-") as tmp:
        path = os.path.join(tmp, "rows.json")
        try:
            run_distributed(worker, world_size=cp, cp=cp, threads=1, args=(*args, path))
            with open(path) as f:
                return json.load(f), None
        except Exception as exc:  # noqa: BLE001 - a crashed world becomes n/a rows
            return None, _reason(exc)


def run_backends(backends: list[str], lengths: list[int], prob: Problem, *, cp: int = CP
                 ) -> list[Row]:
    """Run `backends` in one world of `cp` processes x 1 thread (dense: rank 0 alone)."""
    got, why = run_in_world(_worker, (backends, lengths, prob), cp=cp)
    if why is not None:
        return [Row(n, b, 1 if b == "dense" else cp, error=why)
                for b in backends for n in lengths]
    return [Row(**r) for r in got]


def sent_mib(backend: str, *, length: int, heads: int, head_dim: int, elt_bytes: int,
             cp: int = CP) -> Optional[float]:
    """Analytic bytes each rank sends for one fwd+bwd (MiB); None when not modelled."""
    local = length // cp * heads * head_dim
    if backend == "dense":
        return 0.0
    # the peers send what ours send (plain_ring: dK/dV in float32 too)
    if backend in ("ring", "plain_ring"):
        kv = 2 * local
        acc_bytes = 8 if elt_bytes == 8 else 4
        return (2 * (cp - 1) * kv * elt_bytes + cp * kv * acc_bytes) / 2**20
    if backend in ("ulysses", "ds_ulysses"):
        return 8 * local * elt_bytes * (cp - 1) / cp / 2**20
    return None


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            model = found.group(1).strip() if found else model
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def _label(r: Row) -> str:
    return r.backend if r.backend == "dense" else f"{r.backend} CP={r.cp}"


def _comparable(r: Row) -> bool:
    """Its time is comparable with dense: no more processes than cores."""
    return r.cp <= (os.cpu_count() or 1)


def _dense(rows: list[Row], length: int) -> Optional[Row]:
    return next((r for r in rows if r.backend == "dense" and r.length == length), None)


def _ratio(rows: list[Row], row: Row) -> Optional[float]:
    dense = _dense(rows, row.length)
    if dense is None or dense.time_s is None or row.time_s is None or not _comparable(row):
        return None
    return dense.time_s / row.time_s


def table(rows: list[Row], prob: Problem) -> str:
    elt = torch.empty(0, dtype=DTYPES[prob.dtype]).element_size()
    head = ("| T | backend | fwd+bwd s | min-max s | tokens/s | vs dense | peak MiB/rank "
            "| mem vs dense | sent MiB/rank (analytic) |")
    lines = [head, "|" + "---|" * 9]
    for r in sorted(rows, key=lambda r: (r.length, r.cp, BACKENDS.index(r.backend))):
        sent = sent_mib(r.backend, length=r.length, heads=prob.heads, head_dim=prob.head_dim,
                        elt_bytes=elt, cp=r.cp)
        sent_s = "-" if sent is None else f"{sent:.1f}"
        if r.time_s is None:
            lines.append(f"| {r.length} | {_label(r)} | n/a ({r.error}) | | | | | | {sent_s} |")
            continue
        ratio = _ratio(rows, r)
        dense = _dense(rows, r.length)
        mem = (f"{r.peak_mib / dense.peak_mib:.2f}" if dense and dense.peak_mib else "-")
        star = "" if _comparable(r) else "*"
        lo, hi = r.time_range_s or (r.time_s, r.time_s)
        lines.append(f"| {r.length} | {_label(r)} | {r.time_s:.3f}{star} | {lo:.3f}-{hi:.3f} "
                     f"| {r.length / r.time_s:,.0f}{star} "
                     f"| {'-' if ratio is None else f'{ratio:.2f}x'} | {r.peak_mib:.1f} | {mem} "
                     f"| {sent_s} |")
    if any(not _comparable(r) for r in rows):
        lines.append("")
        lines.append(f"\\* more processes than the {os.cpu_count()} cores: time not comparable, "
                     f"memory is.")
    return "\n".join(lines)


def _versus(rows: list[Row], length: int) -> str:
    """Ours vs its peer at `length` (throughput ratios), for each pair where both ran."""
    def measured(backend: str) -> Optional[Row]:
        return next((r for r in rows if r.backend == backend and r.cp == CP
                     and r.length == length and r.time_s is not None), None)

    parts = []
    for ours, peer in VERSUS:
        a, b = measured(ours), measured(peer)
        if a is not None and b is not None:
            parts.append(f"{ours} {b.time_s / a.time_s:.2f}x {peer}'s throughput")
    if not parts:
        return ""
    return f" Ours vs peers at T={length}, CP={CP}: {', '.join(parts)}."


def verdict(rows: list[Row]) -> str:
    ok = [r for r in rows if r.backend == "ring" and r.cp == CP and _ratio(rows, r) is not None]
    if not ok:
        text = f"Ring CP={CP} vs dense: no comparable measurement."
        return text + (_versus(rows, max(r.length for r in rows)) if rows else "")
    at = next((r for r in ok if r.length == TARGET_LENGTH), max(ok, key=lambda r: r.length))
    ratio = _ratio(rows, at)
    if at.length == TARGET_LENGTH:
        met = "met" if ratio >= TARGET_RATIO else "NOT met"
    else:
        met = f"not judged, T={TARGET_LENGTH} is not in this run"
    dense = _dense(rows, at.length)
    text = (f"Ring CP={CP} at T={at.length}: {ratio:.2f}x dense throughput (target >= "
            f"{TARGET_RATIO} at T={TARGET_LENGTH}): {met}")
    if at.time_range_s and dense is not None and dense.time_range_s:
        # load from other processes only ever adds time: the fastest reps are the cleanest pair
        text += f" (fastest rep vs fastest rep: {dense.time_range_s[0] / at.time_range_s[0]:.2f}x)"
    text += "."
    if at.peak_mib and dense is not None and dense.peak_mib:
        text += (f" Peak attention memory per rank at T={at.length}: dense {dense.peak_mib:.0f} "
                 f"MiB, ring CP={CP} {at.peak_mib:.0f} MiB ({at.peak_mib / dense.peak_mib:.2f}x)")
        more = sorted((r for r in rows if r.backend == "ring" and r.cp > CP
                       and r.length == at.length and r.peak_mib), key=lambda r: r.cp)
        for r in more:
            text += (f", ring CP={r.cp} {r.peak_mib:.0f} MiB ({r.peak_mib / at.peak_mib:.2f}x "
                     f"CP={CP}'s; 1/CP scaling: {CP / r.cp:.2f}x)")
        text += "."
    return text + _versus(rows, at.length)


def plot(rows: list[Row], path: str, prob: Problem) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - the formatter below

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {b: f"C{i}" for i, b in enumerate(BACKENDS)}
    series = sorted({(r.cp, r.backend) for r in rows}, key=lambda s: (s[0], BACKENDS.index(s[1])))
    for cp, backend in series:
        pts = sorted((r.length, r.time_s, r.peak_mib) for r in rows
                     if r.backend == backend and r.cp == cp and r.time_s is not None)
        if not pts:
            continue
        n, t, m = zip(*pts)
        # peers dotted with square markers; ours at CP > cores dashed
        peer = backend in PEERS
        style = dict(marker="s" if peer else "o", color=colors[backend],
                     label=_label(Row(0, backend, cp)),
                     linestyle=":" if peer else "-" if cp <= CP else "--")
        if cp <= (os.cpu_count() or 1):
            ax_t.plot(n, t, **style)
        ax_m.plot(n, m, **style)
    lengths = sorted({r.length for r in rows})
    for ax, what in ((ax_t, "causal fwd+bwd time (s)"), (ax_m, "peak attention MiB per rank")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{prob.heads} heads x {prob.head_dim}, {prob.dtype}, {machine()}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def section(rows: list[Row], prob: Problem, *, command: str, plot_rel: Optional[str]) -> str:
    parts = [
        f"Measured {datetime.date.today().isoformat()} on {machine()}; "
        f"{prob.heads} heads x {prob.head_dim}, batch 1, {prob.dtype}, causal, "
        f"median of {prob.reps} rep{'s' if prob.reps > 1 else ''} after a warm-up. dense = 1 process x {CP} threads; "
        f"CP={CP} backends = {CP} processes x 1 thread over gloo.",
        f"```\n{command}\n```",
        table(rows, prob),
        f"**{verdict(rows)}**",
        "Method:\n\n" + METHOD.strip(),
    ]
    if plot_rel:
        parts.append(f"![attention fwd+bwd time and memory vs length]({plot_rel})")
    return "\n\n".join(parts)


def main(argv: Optional[list[str]] = None) -> None:
    p = argument_parser(__doc__, METHOD)
    p.add_argument("--lengths", default="4096,8192,16384",
                   help="comma-separated global sequence lengths (multiples of 2*CP)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument("--memory-cp", type=int, default=0,
                   help="also run ring and ulysses at this CP degree (e.g. 4) to see memory per "
                        "rank scale; with more processes than cores its times are not comparable")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: lengths {QUICK_LENGTHS}, 1 rep")
    p.add_argument("--out", default=None, help="markdown file to write the section into")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--plot", default=None, help="PNG path for the plot")
    args = p.parse_args(argv)

    lengths = list(QUICK_LENGTHS) if args.quick else [int(x) for x in args.lengths.split(",")]
    reps = 1 if args.quick else args.reps
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise ValueError(f"--backends has {bad}; choose from {list(BACKENDS)}")
    odd = [n for n in lengths if n % (2 * CP)]
    if odd:
        raise ValueError(f"--lengths {odd} are not divisible by 2*CP = {2 * CP}")
    if args.memory_cp and (args.memory_cp <= CP or any(n % (2 * args.memory_cp) for n in lengths)
                           or args.heads % args.memory_cp):
        raise ValueError(f"--memory-cp={args.memory_cp} must be > {CP} and divide --heads="
                         f"{args.heads} and every length / 2")
    if reps < 1:
        raise ValueError(f"--reps={reps} must be >= 1")
    prob = Problem(heads=args.heads, head_dim=args.head_dim, dtype=args.dtype, reps=reps)

    # the children inherit it: megatron's import-time notes about Transformer Engine / Apex
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    rows = run_backends(backends, lengths, prob)
    scaled = [b for b in backends if b in ("ring", "ulysses")]
    if args.memory_cp and scaled:
        # memory is what these rows are for: one timed rep is enough
        rows += run_backends(scaled, lengths, replace(prob, reps=1), cp=args.memory_cp)

    print(f"# {machine()}")
    print(table(rows, prob))
    print(verdict(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    if args.plot:
        plot(rows, args.plot, prob)
        print(f"plot: {args.plot}")
    if args.out:
        command = command_line("benchmarks.attention", argv)
        plot_rel = (os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.out)))
                    if args.plot else None)
        replace_section(args.out, "attention", TITLE,
                        section(rows, prob, command=command, plot_rel=plot_rel))
        print(f"section written to {args.out}")


if __name__ == "__main__":
    main()
