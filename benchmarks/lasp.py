"""LASP-1 vs LASP-2 (linear-attention sequence parallelism) vs ring attention side by side:
one layer's causal fwd+bwd time and the bytes one rank sends, vs sequence length; prints a
table and writes a section of BENCHMARKS.md.

    python -m benchmarks.lasp --lengths 2048,4096,8192,16384 --cp 4 --heads 8 --head-dim 64 \
        --reps 3 --out BENCHMARKS.md

Legend: B batch (1), T global sequence length, H heads, D head dim (keys and values), c the
CP degree. How each figure is measured is `METHOD` below, which also goes into BENCHMARKS.md
with the table.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import json
import os
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from benchmarks.attention import (Problem, _agreed_error, _fwd_bwd, _timed, machine,
                                  run_in_world, sent_mib)
from benchmarks.report import (add_output_args, argument_parser, command_line, join_section,
                               replace_section)
from longtrain.parallel.commtime import wrapped_distributed

CP = 4
METHODS = ("lasp1", "lasp2", "ring")
LENGTHS = (2048, 4096, 8192, 16384)
QUICK_LENGTHS = (512, 1024)
TITLE = "LASP: linear-attention sequence parallelism vs ring attention"

METHOD = """\
- **Methods**, measured in one run on the same inputs, in one world of c gloo processes x 1
  thread: every rank builds seeded `[1, T, H, D]` fp32 tensors q, k = `silu(randn)` (the
  model's non-negative feature map), v and dout = `randn`, and takes its zigzag shards
  (`split_for_cp`). *lasp1* / *lasp2* = `linear_attention(name)(q, k, v, log_decay, meta,
  ctx)` with `log_decay = head_log_decay(H, "slopes")`, `meta = AttentionMeta()` (causal, one
  document), `ctx = AttentionContext(cp_group, cp_size=c, cp_rank)`; *ring* =
  `get_attention("ring")` (causal softmax ring attention) on the same shards: the softmax
  layer of the same size. Each is one layer's attention op, forward then backward with dout
  as the output gradient (= backward of `(o * dout).sum()`). A method that raises is shown
  as n/a with its error and the run goes on without it.
- **Time**: one warm-up rep per method, then the reps with the methods interleaved so that a
  change in the machine's load hits them alike, their order rotating every rep (lasp1 lasp2
  ring, lasp2 ring lasp1, ring lasp1 lasp2, ...): a method measures a few per cent faster
  when it runs first in a round than right after another, so each takes every place
  equally often (use a multiple of 3 reps); each rep
  starts after a barrier and counts as the slowest rank's time; the table shows the median,
  and *min-max* the fastest and slowest rep (other jobs only ever add time: a wide range
  marks a disturbed row). *lasp2 / lasp1* = lasp2's median time / lasp1's at the same T;
  *time / ring* = this row's median time / ring's at the same T (below 1: faster than
  ring). The c processes share the machine's cores: with c above the core count they are
  oversubscribed, so absolute times are inflated and a rank waiting on a message can lose its
  core to another; the methods are compared side by side in the same run. On CPU with gloo
  the intra-chunk compute dominates: lasp1's chain of 2c-1 chunk hops serializes the ranks,
  lasp2's one all-gather of the chunk states does not, but both move little data.
- **Sent/rank/layer** is measured, not computed: during one extra (untimed) fwd+bwd per
  method, after the warm-up, the `torch.distributed` functions these code paths call are
  wrapped (module attributes, restored afterwards) and each call adds what this rank puts on
  the wire: `send` / `isend`: the tensor's bytes; `batch_isend_irecv`: the bytes of its
  `P2POp(isend, ...)` tensors (receives count nothing; `P2POp` is wrapped only to hand torch
  the real `isend`); `all_gather` / `all_gather_into_tensor`: the input tensor's bytes x
  (c - 1) (what one rank sends in a ring all-gather); `all_reduce`: 2 (c - 1) / c x the
  tensor's bytes (ring reduce-scatter + all-gather); `reduce_scatter_tensor`: (c - 1) / c x
  the input's bytes; `all_to_all_single`: the input's bytes minus this rank's own split. The
  table shows the largest rank's total and, where ranks differ, the mean over ranks. It is
  checked against the algorithm: lasp1 sends one `[B, H, D, D]` fp32 state per chain hop to
  another rank (forward S, backward dS); lasp2 all-gathers its 2 chunk states forward (M) and
  backward (dS); ring matches `benchmarks.attention.sent_mib` (c - 1 K/V blocks forward,
  c - 1 K/V blocks and c dK/dV blocks backward, a block being `[T/c, H, D]`).
"""


@dataclass
class Row:
    length: int
    method: str
    # median fwd+bwd seconds over reps (slowest rank per rep); None when it did not run
    time_s: Optional[float] = None
    # fastest and slowest rep: how much the machine's load moved the figure
    time_range_s: Optional[tuple[float, float]] = None
    # bytes sent by each rank in one fwd+bwd, rank order
    sent_bytes: Optional[list[int]] = None
    error: Optional[str] = None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _world(group: Any) -> int:
    return dist.get_world_size(group)


def _all_to_all_sent(a: dict[str, Any]) -> float:
    total = _nbytes(a["input"])
    splits = a["input_split_sizes"]
    rank, world = dist.get_rank(a["group"]), _world(a["group"])
    if not splits:
        return total * (world - 1) / world
    return total * (1 - splits[rank] / sum(splits))


# bytes this rank puts on the wire per call, from the call's bound arguments (see METHOD)
_SENT: dict[str, Callable[[dict[str, Any]], float]] = {
    "send": lambda a: _nbytes(a["tensor"]),
    "isend": lambda a: _nbytes(a["tensor"]),
    "batch_isend_irecv": lambda a: sum(_nbytes(op.tensor) for op in a["p2p_op_list"]
                                       if op.op is torch.distributed.distributed_c10d.isend),
    "all_gather": lambda a: _nbytes(a["tensor"]) * (_world(a["group"]) - 1),
    "all_gather_into_tensor": lambda a: _nbytes(a["input_tensor"]) * (_world(a["group"]) - 1),
    "all_reduce": lambda a: 2 * (_world(a["group"]) - 1) / _world(a["group"]) * _nbytes(a["tensor"]),
    "reduce_scatter_tensor": lambda a: (_world(a["group"]) - 1) / _world(a["group"])
    * _nbytes(a["input"]),
    "all_to_all_single": _all_to_all_sent,
}


@contextlib.contextmanager
def counting_sends() -> Iterator[dict[str, float]]:
    """Count the bytes this rank sends through `torch.distributed` while active; yields
    {function name: bytes}, filled in as the calls happen."""
    sent: dict[str, float] = {}

    def wrap(name: str) -> Callable[..., Any]:
        fn, size = getattr(dist, name), _SENT[name]
        sig = inspect.signature(fn)

        def counted(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            sent[name] = sent.get(name, 0) + size(bound.arguments)
            return fn(*args, **kwargs)

        return counted

    with wrapped_distributed({name: wrap(name) for name in _SENT}):
        yield sent


def _chain_owner(c: int, cp: int) -> int:
    return c if c < cp else 2 * cp - 1 - c


def expected_sent_bytes(method: str, *, length: int, heads: int, head_dim: int, cp: int
                        ) -> list[int]:
    """What each rank should send in one fwd+bwd, from the algorithm (fp32)."""
    state = heads * head_dim * head_dim * 4
    if method == "ring":
        mib = sent_mib("ring", length=length, heads=heads, head_dim=head_dim, elt_bytes=4, cp=cp)
        return [round(mib * 2**20)] * cp
    if method == "lasp2":
        # 2 chunk states per rank, to c - 1 ranks, forward (M) and backward (dS)
        return [2 * 2 * (cp - 1) * state] * cp
    hops = [0] * cp
    for c in range(2 * cp - 1):
        # forward c -> c + 1, backward c + 1 -> c: a message where the owners differ
        if _chain_owner(c, cp) != _chain_owner(c + 1, cp):
            hops[_chain_owner(c, cp)] += 1
            hops[_chain_owner(c + 1, cp)] += 1
    return [h * state for h in hops]


def sent_per_rank(sent: float) -> list[int]:
    """Every rank's count of bytes sent (a collective: every rank calls it)."""
    per_rank = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(per_rank, torch.tensor([sent], dtype=torch.float64))
    return [round(float(x)) for x in per_rank]


def time_rotating(steps: dict[str, Callable[[], None]], times: dict[str, list[float]], *,
                  reps: int) -> None:
    """Append each method's rep times to `times`, the order rotating every rep: a rep runs
    measurably faster first in its round than right after another method (allocator / cache
    state), so each method takes each position equally often."""
    order = list(steps)
    for rep in range(reps):
        for m in order[rep % len(order):] + order[:rep % len(order)]:
            times[m].append(_timed(steps[m])[0])


def _lasp_step(runtime: Any, method: str, qkvd_bthd: list[torch.Tensor], heads: int
               ) -> Callable[[], None]:
    from longtrain.attention.base import AttentionContext, AttentionMeta
    from longtrain.attention.linear import head_log_decay, linear_attention
    from longtrain.parallel.layout import split_for_cp

    attn = linear_attention(method)
    cp, rank = runtime.dims.cp, runtime.cp_rank
    ctx = AttentionContext(cp_group=runtime.cp_group, cp_size=cp, cp_rank=rank)
    meta = AttentionMeta()
    log_decay = head_log_decay(heads, "slopes")
    q, k, v, dout = (split_for_cp(x, cp_size=cp, cp_rank=rank, dim=1).contiguous()
                     for x in qkvd_bthd)

    def step() -> None:
        ins = [x.detach().requires_grad_() for x in (q, k, v)]
        attn(*ins, log_decay, meta, ctx).backward(dout)

    return step


def _measure_length(runtime: Any, length: int, prob: Problem, failed: dict[str, str]
                    ) -> list[Row]:
    gen = torch.Generator().manual_seed(length)
    shape = (1, length, prob.heads, prob.head_dim)
    q, k = (torch.nn.functional.silu(torch.randn(shape, generator=gen)) for _ in range(2))
    v, dout = (torch.randn(shape, generator=gen) for _ in range(2))
    qkvd = [q, k, v, dout]
    rows = {m: Row(length, m, error=failed.get(m)) for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    with contextlib.ExitStack() as stack:
        steps = {}
        for m in METHODS:
            if m in failed:
                continue
            error, sent = None, 0.0
            try:
                steps[m] = (stack.enter_context(_fwd_bwd(runtime, m, qkvd, prob.causal))
                            if m == "ring" else _lasp_step(runtime, m, qkvd, prob.heads))
                # warm-up: first-call costs (imports, gloo buffers) stay out of the figures
                steps[m]()
                with counting_sends() as counts:
                    steps[m]()
                sent = sum(counts.values())
            except Exception as exc:  # noqa: BLE001 - reported as a table row
                error = exc
            why = _agreed_error(error)
            if why is not None:
                failed[m] = rows[m].error = why
                steps.pop(m, None)
                continue
            rows[m].sent_bytes = sent_per_rank(sent)
        time_rotating(steps, times, reps=prob.reps)
    for m, row in rows.items():
        if times[m]:
            row.time_s = statistics.median(times[m])
            row.time_range_s = (min(times[m]), max(times[m]))
    return list(rows.values())


def _worker(runtime: Any, lengths: list[int], prob: Problem, result_path: str) -> None:
    failed: dict[str, str] = {}
    rows = []
    for length in lengths:
        rows += _measure_length(runtime, length, prob, failed)
        if dist.get_rank() == 0:
            print(f"  T={length} done", flush=True)
    if dist.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump([asdict(r) for r in rows], f)


def run_methods(lengths: list[int], prob: Problem, *, cp: int) -> list[Row]:
    """Measure every method at every length in one world of `cp` processes x 1 thread."""
    got, why = run_in_world(_worker, (lengths, prob), cp=cp)
    if why is not None:
        return [Row(n, m, error=why) for n in lengths for m in METHODS]
    return [Row(**r) for r in got]


def _bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _sent_text(r: Row) -> str:
    if not r.sent_bytes:
        return "-"
    top, mean = max(r.sent_bytes), statistics.mean(r.sent_bytes)
    return _bytes(top) if top == mean else f"{_bytes(top)} (mean {_bytes(mean)})"


def _find(rows: list[Row], length: int, method: str) -> Optional[Row]:
    return next((r for r in rows if r.length == length and r.method == method), None)


def _time_ratio(a: Optional[Row], b: Optional[Row]) -> Optional[float]:
    if a is None or b is None or a.time_s is None or b.time_s is None:
        return None
    return a.time_s / b.time_s


def _fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(rows: list[Row]) -> str:
    head = ("| T | method | fwd+bwd ms | min-max ms | sent/rank/layer, max over ranks "
            "| lasp2 / lasp1 time | time / ring |")
    lines = [head, "|" + "---|" * 7]
    for r in sorted(rows, key=lambda r: (r.length, METHODS.index(r.method))):
        if r.time_s is None:
            lines.append(f"| {r.length} | {r.method} | n/a ({r.error}) | | {_sent_text(r)} | | |")
            continue
        lo, hi = r.time_range_s or (r.time_s, r.time_s)
        l2l1 = (_time_ratio(r, _find(rows, r.length, "lasp1")) if r.method == "lasp2" else None)
        vs_ring = (_time_ratio(r, _find(rows, r.length, "ring")) if r.method != "ring" else None)
        lines.append(f"| {r.length} | {r.method} | {r.time_s * 1e3:.1f} "
                     f"| {lo * 1e3:.1f}-{hi * 1e3:.1f} | {_sent_text(r)} | {_fmt_ratio(l2l1)} "
                     f"| {_fmt_ratio(vs_ring)} |")
    return "\n".join(lines)


def bytes_flat(rows: list[Row], method: str) -> Optional[bool]:
    """Every rank sends the same bytes at every measured T (None: fewer than 2 lengths)."""
    counts = [tuple(r.sent_bytes) for r in rows if r.method == method and r.sent_bytes]
    return None if len(counts) < 2 else len(set(counts)) == 1


def verdict(rows: list[Row], *, prob: Problem, cp: int) -> list[str]:
    lines = []
    flat = {m: bytes_flat(rows, m) for m in ("lasp1", "lasp2")}
    if None in flat.values():
        lines.append("LASP's bytes flat in length: not judged (needs 2 measured lengths).")
    else:
        met = "met" if all(flat.values()) else "NOT met"
        each = ", ".join(f"{m} {'flat' if ok else 'varies'}" for m, ok in flat.items())
        lines.append(f"LASP's bytes flat in length: {met} ({each}).")
    ring = sorted((r for r in rows if r.method == "ring" and r.sent_bytes), key=lambda r: r.length)
    if len(ring) >= 2:
        lo, hi = ring[0], ring[-1]
        lines.append(f"Ring's bytes grow with length: x{max(hi.sent_bytes) / max(lo.sent_bytes):.2f}"
                     f" from T={lo.length} to T={hi.length} (length x{hi.length / lo.length:.2f}).")
    # load from other processes only ever adds time: the fastest reps are the cleanest pair
    pairs, slower = [], []
    for n in sorted({r.length for r in rows}):
        l2, l1 = _find(rows, n, "lasp2"), _find(rows, n, "lasp1")
        ratio = _time_ratio(l2, l1)
        if ratio is None:
            continue
        fastest = l2.time_range_s[0] / l1.time_range_s[0]
        pairs.append(f"T={n} {ratio:.2f}x ({fastest:.2f}x)")
        if ratio > 1:
            slower.append(f"T={n}")
    target = f"lasp2 time <= lasp1 time at CP={cp}"
    if not pairs:
        lines.append(f"{target}: not judged (no measurement).")
    else:
        met = "met at every measured T" if not slower else f"NOT met at {', '.join(slower)}"
        lines.append(f"{target}: {met}; lasp2 / lasp1 median time (fastest rep vs fastest rep): "
                     f"{', '.join(pairs)}.")
    wrong = []
    for r in rows:
        if r.sent_bytes:
            want = expected_sent_bytes(r.method, length=r.length, heads=prob.heads,
                                       head_dim=prob.head_dim, cp=cp)
            if r.sent_bytes != want:
                wrong.append(f"{r.method} T={r.length} {r.sent_bytes} vs {want}")
    lines.append("Measured bytes vs the algorithm's count: "
                 + ("equal for every row." if not wrong else "DIFFER: " + "; ".join(wrong)))
    return lines


def section(rows: list[Row], prob: Problem, *, cp: int, command: str) -> str:
    cores = os.cpu_count() or 1
    share = (f"oversubscribed: {cp} processes on {cores} cores" if cp > cores
             else f"{cp} processes on {cores} cores")
    parts = [
        f"Measured {datetime.date.today().isoformat()} on {machine()}; {prob.heads} heads x "
        f"{prob.head_dim}, batch 1, fp32, causal, median of {prob.reps} "
        f"rep{'s' if prob.reps > 1 else ''} after a warm-up; CP={cp} = {cp} processes x 1 "
        f"thread over gloo ({share}).",
        f"```\n{command}\n```",
        table(rows),
    ]
    return join_section(parts, verdict(rows, prob=prob, cp=cp), METHOD)


def main(argv: Optional[list[str]] = None) -> list[Row]:
    p = argument_parser(__doc__, METHOD)
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)),
                   help="comma-separated global sequence lengths (multiples of 2*CP)")
    p.add_argument("--cp", type=int, default=CP, help="context-parallel degree (processes)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: lengths {QUICK_LENGTHS}, 1 rep")
    add_output_args(p)
    args = p.parse_args(argv)

    lengths = list(QUICK_LENGTHS) if args.quick else [int(x) for x in args.lengths.split(",")]
    reps = 1 if args.quick else args.reps
    if args.cp < 2:
        raise ValueError(f"--cp={args.cp} must be >= 2")
    odd = [n for n in lengths if n <= 0 or n % (2 * args.cp)]
    if odd:
        raise ValueError(f"--lengths {odd} are not positive multiples of 2*CP = {2 * args.cp}")
    if reps < 1 or args.heads < 1 or args.head_dim < 1:
        raise ValueError(f"--reps={reps}, --heads={args.heads}, --head-dim={args.head_dim} "
                         f"must be >= 1")
    prob = Problem(heads=args.heads, head_dim=args.head_dim, dtype="fp32", reps=reps)

    # the children inherit it: megatron's import-time notes about Transformer Engine / Apex
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    rows = run_methods(lengths, prob, cp=args.cp)

    print(f"# {machine()}")
    print(table(rows))
    print("\n".join(verdict(rows, prob=prob, cp=args.cp)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f)
    if args.out:
        command = command_line("benchmarks.lasp", argv)
        replace_section(args.out, "lasp", TITLE,
                        section(rows, prob, cp=args.cp, command=command))
        print(f"section written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
