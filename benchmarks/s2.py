"""S2-Attention (block-sparse, per-head strided blocks) vs dense attention side by side, on
one process and under CP=2: one attention op's causal fwd+bwd time, peak memory and the bytes
one rank sends, vs sequence length; prints a table and writes a section of BENCHMARKS.md.

    python -m benchmarks.s2 --lengths 4096,8192,16384 --heads 8 --head-dim 64 \
        --vert-stride 8 --reps 6 --out BENCHMARKS.md

Legend: B batch (1), T global sequence length, H query heads, Hkv key/value heads, D head
dim, bs the pattern's block size, c the CP degree (2). How each figure is measured is
`METHOD` below, which also goes into BENCHMARKS.md with the table.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from benchmarks.attention import (_agreed_error, _fwd_bwd, _pin_mmap_threshold, _timed,
                                  attention_step, machine, run_in_world, sent_mib)
from benchmarks.lasp import _bytes, counting_sends, sent_per_rank, time_rotating
from benchmarks.report import (add_output_args, argument_parser, command_line, join_section,
                               replace_section)

CP = 2
METHODS = ("dense", "s2", "ring", "s2 cp2")
# processes each method runs on
RANKS = {"dense": 1, "s2": 1, "ring": CP, "s2 cp2": CP}
LENGTHS = (4096, 8192, 16384)
QUICK_LENGTHS = (1024, 2048)
TARGET_RATIO = 0.3
TARGET_LENGTH = 16384
TARGET_STRIDE = 8
# mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
TITLE = "S2-Attention: block-sparse vs dense, one process and CP=2"

METHOD = """\
- **Methods**, measured in one run on the same inputs, in one world of 2 gloo processes: every
  rank builds seeded fp32 `randn` tensors q, dout `[1, T, H, D]` and k, v `[1, T, Hkv, D]`.
  *dense* = rank 0 alone with 2 threads (every core) running `get_attention("dense")` (torch
  SDPA, causal) on the whole sequence while rank 1 waits; *s2* = rank 0 alone, 2 threads,
  `make_s2_attention(pattern)` with `pattern = S2Pattern(num_heads=H, block_size, local_blocks,
  vert_stride)`, `AttentionContext()` (cp=1) and `AttentionMeta()` (causal, one document):
  on CPU the block-skipping PyTorch path (`kernels/longtrain_kernels/s2_attn/blocked.py`); *ring* = both ranks x
  1 thread, `get_attention("ring")` on the zigzag shards (`split_for_cp`) with
  `AttentionContext(cp_group, cp_size=2, cp_rank)`; *s2 cp2* = both ranks x 1 thread, the same
  `make_s2_attention(pattern)` on the zigzag shards with that CP context (each rank receives
  only the K/V blocks its heads can see, and returns their gradients in backward). Each is
  one attention op, forward then backward with dout as the output gradient. A method that
  raises is shown as n/a with its error and the run goes on without it.
- **Two passes** in the same processes. First, for every T, a warm-up and one rep per method
  for the memory figure, with glibc's mmap threshold pinned at 64 KiB from the start (every
  tensor its own mapping, returned to the kernel when freed and counted when touched). Then,
  for every T, one untimed rep per method (a warm-up; it also counts the bytes sent) and the
  timed reps, with the mmap threshold at 32 MiB and the trim threshold at 64 MiB, where
  glibc's dynamic thresholds settle in a long-running process: temporaries are reused from
  the heap as in a trainer, not mapped and page-faulted afresh on every call (which cost the
  chunked s2 path 10-25% in a one-thread check at T=8192). The memory pass runs first
  because memory the steady heap keeps after a free would otherwise hide, or fragment into,
  later peaks.
- **Time**: the reps with the methods interleaved so that a change in the machine's load hits
  them alike, their order rotating every rep (dense s2 ring "s2 cp2", s2 ring "s2 cp2" dense,
  ...) so that no method is favoured by its place in a round (a multiple of 4 reps gives each
  method every place equally often); each rep starts after a barrier and counts as the
  slowest rank's time; the table shows the median, and *min-max* the fastest and slowest rep
  (other jobs only ever add time: a wide range marks a disturbed row). *time / dense* = this
  row's median time / dense's median time at the same T (below 1: faster than dense; the
  target is s2's at T=16384 with vert_stride 8 <= 0.3). The s2 path runs some 20 small ops
  per chunk of query blocks, each an OpenMP parallel region: with 2 threads it slows down
  several times when another process takes a core (dense, a few large ops, hardly), so s2's
  one-process rows are the ones a busy machine disturbs most.
- **Peak MiB/rank** is the op's working set, as in the attention benchmark, from the memory
  pass's rep: every rank resets its peak RSS (`5 > /proc/self/clear_refs`) and takes its RSS
  as the baseline (the inputs are part of it); the figure is VmHWM minus the baseline,
  largest rank. The one-process methods' idle rank adds nothing.
- **Sent/rank** (CP rows) is measured, not computed: during the untimed rep the
  `torch.distributed` send functions are wrapped (`benchmarks.lasp.counting_sends`: `isend` /
  `send` their tensor's bytes, `batch_isend_irecv` the bytes of its isend ops, collectives
  what one rank puts on the wire); largest rank, and the mean where ranks differ. *sent /
  ring* = this row's largest rank / ring's. A ring sends its K/V shard (c - 1) times
  forward, again backward, plus c dK/dV blocks; s2 cp2 sends each K/V block a peer needs once
  forward and each received block's gradient once backward.
- **K/V fraction**: the planned share of the other ranks' K/V blocks a rank receives,
  `s2_needed_fraction(pattern, heads, cp=2, chunk_blocks=T / (2c bs))` (1.0 = a ring's worth),
  vs the measured one = s2 cp2's mean sent bytes per rank / (2 (c - 1) x one rank's K/V shard
  bytes, `2 [T/c, Hkv, D]` fp32): the 2 is forward blocks plus backward gradients. With at
  least vert_stride heads on a rank the heads' vertical phases cover every block, so a rank
  needs every block before its queries: the fraction is then causality's share alone (3/4 at
  c=2: rank 1 never needs chunk 3), and s2 cp2 sends less than a ring only because it skips
  future blocks and does not resend K/V in backward. Fewer heads per rank (tensor
  parallelism, or --heads below vert_stride) make the fraction smaller.
"""


@dataclass(frozen=True)
class Problem:
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    local_blocks: int
    vert_stride: int
    reps: int

    def pattern(self) -> Any:
        from longtrain_kernels.s2_attn import S2Pattern

        return S2Pattern(num_heads=self.heads, block_size=self.block_size,
                         local_blocks=self.local_blocks, vert_stride=self.vert_stride)


@dataclass
class Row:
    length: int
    method: str
    # median fwd+bwd seconds over reps (slowest rank per rep); None when it did not run
    time_s: Optional[float] = None
    # fastest and slowest rep: how much the machine's load moved the figure
    time_range_s: Optional[tuple[float, float]] = None
    # the op's working set, largest rank, one rep, MiB (memory pass)
    peak_mib: Optional[float] = None
    # bytes sent by each rank in one fwd+bwd, rank order (CP rows only)
    sent_bytes: Optional[list[int]] = None
    error: Optional[str] = None


def _s2_step(runtime: Any, qkvd_bthd: list[torch.Tensor], prob: Problem, *, cp: bool
             ) -> Callable[[], None]:
    """A callable running one fwd+bwd of s2 attention: rank 0 alone on every core (cp=False)
    or every rank on its zigzag shard (cp=True)."""
    from longtrain.attention.base import AttentionMeta
    from longtrain.attention.s2 import make_s2_attention

    return attention_step(make_s2_attention(prob.pattern()), runtime, qkvd_bthd,
                          AttentionMeta(), alone=not cp)


def _step(stack: contextlib.ExitStack, runtime: Any, method: str, qkvd: list[torch.Tensor],
          prob: Problem) -> Callable[[], None]:
    if method in ("dense", "ring"):
        return stack.enter_context(_fwd_bwd(runtime, method, qkvd, True))
    return _s2_step(runtime, qkvd, prob, cp=method == "s2 cp2")


def _steady_heap() -> None:
    # what glibc's dynamic thresholds settle at in a long-running process: tensors up to
    # 32 MiB are reused from the heap, not mapped and page-faulted afresh on every call
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)


def _inputs(length: int, prob: Problem) -> list[torch.Tensor]:
    """q, k, v, dout: the same seeded tensors in both passes."""
    gen = torch.Generator().manual_seed(length)
    return [torch.randn(1, length, h, prob.head_dim, generator=gen)
            for h in (prob.heads, prob.kv_heads, prob.kv_heads, prob.heads)]


def _run_once(steps: dict[str, Callable[[], None]], method: str, failed: dict[str, str],
              row: Row, run: Callable[[], Any]) -> Any:
    """`run()` on every rank; a failure on any rank drops the method everywhere."""
    error, result = None, None
    try:
        result = run()
    except Exception as exc:  # noqa: BLE001 - reported as a table row
        error = exc
    why = _agreed_error(error)
    if why is not None:
        failed[method] = row.error = why
        steps.pop(method, None)
    return result


def _memory_pass(runtime: Any, length: int, prob: Problem, failed: dict[str, str]
                 ) -> list[Row]:
    """A warm-up and one rep per method, for the peak memory (heap pinned, see METHOD)."""
    qkvd = _inputs(length, prob)
    rows = {m: Row(length, m, error=failed.get(m)) for m in METHODS}
    with contextlib.ExitStack() as stack:
        steps: dict[str, Callable[[], None]] = {}
        for m in METHODS:
            if m in failed:
                continue

            def warm_up() -> None:
                steps[m] = _step(stack, runtime, m, qkvd, prob)
                # first-call costs (imports, gloo buffers, the s2 plan) stay out of the figures
                steps[m]()

            _run_once(steps, m, failed, rows[m], warm_up)
            if m in steps:
                rows[m].peak_mib = _timed(steps[m])[1]
    return list(rows.values())


def _timing_pass(runtime: Any, rows: list[Row], prob: Problem, failed: dict[str, str]) -> None:
    """Fill in the rows' times and bytes sent (heap steady, see METHOD)."""
    length = rows[0].length
    qkvd = _inputs(length, prob)
    by_method = {r.method: r for r in rows}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    with contextlib.ExitStack() as stack:
        steps: dict[str, Callable[[], None]] = {}
        for m in METHODS:
            if m in failed or by_method[m].error is not None:
                continue

            def counted() -> float:
                steps[m] = _step(stack, runtime, m, qkvd, prob)
                # a warm-up in this heap regime; it counts the CP methods' bytes
                with counting_sends() as counts:
                    steps[m]()
                return sum(counts.values())

            sent = _run_once(steps, m, failed, by_method[m], counted)
            if m in steps and RANKS[m] > 1:
                by_method[m].sent_bytes = sent_per_rank(sent)
        time_rotating(steps, times, reps=prob.reps)
    for m, row in by_method.items():
        if times[m]:
            row.time_s = statistics.median(times[m])
            row.time_range_s = (min(times[m]), max(times[m]))


def _worker(runtime: Any, lengths: list[int], prob: Problem, result_path: str) -> None:
    # memory first, for every length, before the steady heap has kept any freed memory; a
    # method that fails at one length is not tried at longer ones
    _pin_mmap_threshold()
    failed: dict[str, str] = {}
    rows = [_memory_pass(runtime, length, prob, failed) for length in lengths]
    if dist.get_rank() == 0:
        print("  memory pass done", flush=True)
    _steady_heap()
    failed = {}
    for length_rows in rows:
        _timing_pass(runtime, length_rows, prob, failed)
        if dist.get_rank() == 0:
            print(f"  T={length_rows[0].length} done", flush=True)
    if dist.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump([asdict(r) for group in rows for r in group], f)


def run_methods(lengths: list[int], prob: Problem) -> list[Row]:
    """Measure every method at every length in one world of 2 processes x 1 thread."""
    got, why = run_in_world(_worker, (lengths, prob), cp=CP)
    if why is not None:
        return [Row(n, m, error=why) for n in lengths for m in METHODS]
    return [Row(**r) for r in got]


def kv_shard_bytes(length: int, prob: Problem) -> int:
    """One rank's K and V shards, fp32: 2 [T/c, Hkv, D]."""
    return 2 * length // CP * prob.kv_heads * prob.head_dim * 4


def planned_fraction(length: int, prob: Problem) -> float:
    from longtrain.attention.s2 import s2_needed_fraction

    return s2_needed_fraction(prob.pattern(), tuple(range(prob.heads)), cp=CP,
                              chunk_blocks=length // (2 * CP * prob.block_size))


def measured_fraction(row: Row, prob: Problem) -> Optional[float]:
    """s2 cp2's mean bytes per rank / 2 (c - 1) K/V shards (see METHOD)."""
    if not row.sent_bytes:
        return None
    return statistics.mean(row.sent_bytes) / (2 * (CP - 1) * kv_shard_bytes(row.length, prob))


def expected_ring_bytes(length: int, prob: Problem) -> int:
    mib = sent_mib("ring", length=length, heads=prob.kv_heads, head_dim=prob.head_dim,
                   elt_bytes=4, cp=CP)
    return round(mib * 2**20)


def _find(rows: list[Row], length: int, method: str) -> Optional[Row]:
    return next((r for r in rows if r.length == length and r.method == method), None)


def _time_ratio(a: Optional[Row], b: Optional[Row]) -> Optional[float]:
    if a is None or b is None or a.time_s is None or b.time_s is None:
        return None
    return a.time_s / b.time_s


def _fastest_ratio(a: Row, b: Row) -> float:
    return a.time_range_s[0] / b.time_range_s[0]


def _sent_text(r: Row) -> str:
    if not r.sent_bytes:
        return "-"
    top, mean = max(r.sent_bytes), statistics.mean(r.sent_bytes)
    return _bytes(top) if top == mean else f"{_bytes(top)} (mean {_bytes(mean)})"


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(rows: list[Row]) -> str:
    head = ("| T | method | ranks | fwd+bwd ms | min-max ms | peak MiB/rank | time / dense "
            "| sent/rank, max over ranks | sent / ring |")
    lines = [head, "|" + "---|" * 9]
    for r in sorted(rows, key=lambda r: (r.length, METHODS.index(r.method))):
        ranks = RANKS[r.method]
        if r.time_s is None:
            lines.append(f"| {r.length} | {r.method} | {ranks} | n/a ({r.error}) | | | | "
                         f"{_sent_text(r)} | |")
            continue
        lo, hi = r.time_range_s or (r.time_s, r.time_s)
        vs_dense = _time_ratio(r, _find(rows, r.length, "dense")) if r.method != "dense" else None
        ring = _find(rows, r.length, "ring")
        vs_ring = (max(r.sent_bytes) / max(ring.sent_bytes)
                   if r.method == "s2 cp2" and r.sent_bytes and ring and ring.sent_bytes
                   else None)
        lines.append(f"| {r.length} | {r.method} | {ranks} | {r.time_s * 1e3:.0f} "
                     f"| {lo * 1e3:.0f}-{hi * 1e3:.0f} | {r.peak_mib:.1f} | {_fmt(vs_dense)} "
                     f"| {_sent_text(r)} | {_fmt(vs_ring)} |")
    return "\n".join(lines)


def verdict(rows: list[Row], *, prob: Problem) -> list[str]:
    lines = []
    s2, dense = _find(rows, TARGET_LENGTH, "s2"), _find(rows, TARGET_LENGTH, "dense")
    ratio = _time_ratio(s2, dense)
    target = (f"s2 / dense time at {TARGET_LENGTH} with vert_stride {TARGET_STRIDE}: "
              f"{_fmt(ratio)} (target <= {TARGET_RATIO})")
    if prob.vert_stride != TARGET_STRIDE:
        lines.append(f"{target}: not judged, this run uses vert_stride {prob.vert_stride}.")
    elif ratio is None:
        lines.append(f"{target}: not judged, no s2 and dense measurement at T={TARGET_LENGTH}.")
    else:
        met = "met" if ratio <= TARGET_RATIO else "NOT met"
        # load from other processes only ever adds time: the fastest reps are the cleanest pair
        lines.append(f"{target}: {met} (fastest rep vs fastest rep: "
                     f"{_fastest_ratio(s2, dense):.2f}).")
    pairs = []
    for n in sorted({r.length for r in rows}):
        s2cp, ring = _find(rows, n, "s2 cp2"), _find(rows, n, "ring")
        ratio = _time_ratio(s2cp, ring)
        if ratio is None:
            continue
        text = f"T={n} time {ratio:.2f}x ({_fastest_ratio(s2cp, ring):.2f}x fastest reps)"
        if s2cp.sent_bytes and ring.sent_bytes:
            text += f", bytes {max(s2cp.sent_bytes) / max(ring.sent_bytes):.2f}x"
        pairs.append(text)
    lines.append(f"s2 cp2 vs ring at CP={CP} (s2 cp2 / ring): "
                 + ("; ".join(pairs) if pairs else "not judged (no measurement)") + ".")
    fractions, wrong = [], []
    for r in rows:
        if r.method == "s2 cp2" and r.sent_bytes:
            plan, got = planned_fraction(r.length, prob), measured_fraction(r, prob)
            fractions.append(f"T={r.length} planned {plan:.3f}, measured {got:.3f}")
            if abs(plan - got) > 1e-9:
                wrong.append(f"T={r.length}")
        if r.method == "ring" and r.sent_bytes:
            want = expected_ring_bytes(r.length, prob)
            if r.sent_bytes != [want] * CP:
                wrong.append(f"ring T={r.length} {r.sent_bytes} vs {want}")
    if fractions:
        lines.append("s2 cp2's share of the other ranks' K/V blocks (s2_needed_fraction): "
                     + "; ".join(fractions) + "; measured bytes vs plan: "
                     + ("equal for every row (ring: equal to its analytic count)."
                        if not wrong else "DIFFER at " + ", ".join(wrong) + "."))
    return lines


def section(rows: list[Row], prob: Problem, *, command: str) -> str:
    kv = f", {prob.kv_heads} K/V heads" if prob.kv_heads != prob.heads else ""
    parts = [
        f"Measured {datetime.date.today().isoformat()} on {machine()}; {prob.heads} heads "
        f"x {prob.head_dim}{kv}, batch 1, fp32, causal; S2 pattern block_size "
        f"{prob.block_size}, local_blocks {prob.local_blocks}, vert_stride {prob.vert_stride}; "
        f"median of {prob.reps} rep{'s' if prob.reps > 1 else ''} after a warm-up. dense, s2 = "
        f"1 process x {os.cpu_count()} threads; ring, s2 cp2 = {CP} processes x 1 thread over "
        f"gloo.",
        f"```\n{command}\n```",
        table(rows),
    ]
    return join_section(parts, verdict(rows, prob=prob), METHOD)


def main(argv: Optional[list[str]] = None) -> list[Row]:
    p = argument_parser(__doc__, METHOD)
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)),
                   help="comma-separated global sequence lengths (multiples of 2*CP*block)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="K/V heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--local-blocks", type=int, default=4)
    p.add_argument("--vert-stride", type=int, default=8)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: lengths {QUICK_LENGTHS}, 1 rep")
    add_output_args(p)
    args = p.parse_args(argv)

    lengths = list(QUICK_LENGTHS) if args.quick else [int(x) for x in args.lengths.split(",")]
    reps = 1 if args.quick else args.reps
    kv_heads = args.heads if args.kv_heads is None else args.kv_heads
    if min(reps, args.heads, kv_heads, args.head_dim) < 1 or args.heads % kv_heads:
        raise ValueError(f"--reps={reps}, --heads={args.heads}, --kv-heads={kv_heads}, "
                         f"--head-dim={args.head_dim} must be >= 1 and --heads a multiple of "
                         f"--kv-heads")
    prob = Problem(heads=args.heads, kv_heads=kv_heads, head_dim=args.head_dim,
                   block_size=args.block_size, local_blocks=args.local_blocks,
                   vert_stride=args.vert_stride, reps=reps)
    prob.pattern().check()
    unit = 2 * CP * args.block_size
    odd = [n for n in lengths if n <= 0 or n % unit]
    if odd:
        raise ValueError(f"--lengths {odd} are not positive multiples of 2*CP*--block-size = "
                         f"{unit}")

    # the children inherit it: megatron's import-time notes about Transformer Engine / Apex
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    rows = run_methods(lengths, prob)

    print(f"# {machine()}")
    print(table(rows))
    print("\n".join(verdict(rows, prob=prob)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f)
    if args.out:
        command = command_line("benchmarks.s2", argv)
        replace_section(args.out, "s2", TITLE, section(rows, prob, command=command))
        print(f"section written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
