"""Memory policies side by side (none, int8, selective, full and their int8 combinations) at
CP=1 and CP=2: one training fwd+bwd's saved activation bytes, peak memory and step time per
rank vs sequence length, next to the activation-memory model (longtrain.memory.estimate), and
the longest sequence each policy fits in a memory budget; prints tables and writes a section
of BENCHMARKS.md.

    python -m benchmarks.memory --lengths 2048,4096,8192 --reps 3 --budget-mib 512 \
        --out BENCHMARKS.md

Legend: T global sequence length, c the CP degree, T/c a rank's tokens; MiB per rank. The
model is `MODEL` below (fp32, micro-batch 1, byte vocabulary). How each figure is measured
is `METHOD` below, which also goes into BENCHMARKS.md with the tables.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from benchmarks.attention import _agreed_error, _pin_mmap_threshold, _timed, machine, run_in_world
from benchmarks.lasp import _fmt_ratio, time_rotating
from benchmarks.report import (add_output_args, argument_parser, command_line, join_section,
                               replace_section)
from benchmarks.s2 import _steady_heap

CP = 2
CPS = (1, CP)
# (memory.activations, memory.checkpointing), the baseline first
POLICIES = (("none", "none"), ("int8", "none"), ("none", "selective"), ("int8", "selective"),
            ("none", "full"), ("int8", "full"))
# larger than the tiny model, so that activations dominate: 4 layers x 256, 8 heads of 32
# (4 K/V heads), SwiGLU 768, the byte tokenizer's 256 ids
MODEL = dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
             intermediate_size=768, vocab_size=256)
LENGTHS = (2048, 4096, 8192)
QUICK_LENGTHS = (512, 1024)
BUDGET_MIB = 512.0
QUICK_BUDGET_MIB = 96.0
# lengths of the budget table are multiples of 2 * c * LENGTH_BLOCK
LENGTH_BLOCK = 64
TARGET_CUT, TARGET_OVERHEAD, TARGET_FIT = 0.45, 0.15, 4.0
VERIFY_LIMIT_S = 60.0
MIB = float(1 << 20)
TITLE = "Memory policies: activation memory, step time and the longest sequence a budget fits"

METHOD = """\
- **Policies**, measured in one run on the same model and inputs: every rank builds the model
  once (`build_model`, seeded weights; `MODEL` in benchmarks/memory.py: 4 layers, hidden 256,
  8 heads of 32 with 4 K/V heads, SwiGLU 768, vocabulary 256, fp32) and one
  `ActivationStore` per policy (`store_for(memory)`); a policy's step switches the model to it
  (`apply_memory_policy(model, store, checkpointing)`), runs `model(tokens, positions, seq_len=T)` on
  seeded random tokens (this rank's zigzag shard, `split_for_cp`), then
  `token_loss_sum(logits, labels).backward()`, and drops the gradients (set to None, as the
  trainer's `zero_grad`). No optimizer step. *CP=1* = 1 process x 2 threads (every core),
  attention `dense` (torch SDPA); *CP=2* = 2 gloo processes x 1 thread, attention `ring`.
- **Saved MiB/rank** = `store.stats.device_bytes` after the forward: the bytes of every
  tensor the forward saved for the backward, as stored (int8 values plus float32 scales, or
  the tensor's whole storage when kept as is; each storage once); exact and deterministic,
  largest rank. *model* = the planner's prediction for the same shape and policy,
  `activation_bytes(Shape.of(cfg), Policy(...))["layers"] + ["final"]`; *vs none* = saved
  bytes / the none row's at the same T and CP.
- **Peak MiB/rank**, in a memory pass before any timing: glibc's mmap threshold pinned at
  64 KiB (every tensor its own mapping, counted when touched and returned when freed); one
  warm-up step per policy at the first length, then one step per policy and length, each
  after a barrier and a reset of the kernel's peak-RSS counter (`5 > /proc/self/clear_refs`);
  the figure is VmHWM minus the RSS at the reset (the parameters are in the baseline, the
  gradients are not), largest rank. It holds everything the step adds: saved tensors,
  logits and the loss's float32 copy, gradients, the attention's and the backward's
  transients, and under full recomputation the recomputed layer. *model peak* = the
  planner's `activation_bytes(...)["total"]` (saved tensors, full's recomputed layer, logits)
  plus the gradients (`static_bytes(...)["grads"]`). The planner leaves out the backward's
  working set of one layer (the gradients of its activations, the attention backward's
  buffers and, under int8, the dequantized copies of its saved tensors), so it
  under-predicts the peak most where little is saved (int8, full).
- **Step s**: then, with glibc's thresholds where a long-running process settles (mmap 32
  MiB, trim 64 MiB: temporaries reused from the heap as in a trainer), for every length one
  warm-up step per policy and the timed reps with the policies interleaved, their order
  rotating every rep (`benchmarks.lasp.time_rotating`) so that a change in the machine's load
  hits them alike and none always runs first; each rep starts after a barrier and counts as
  the slowest rank's time; the table shows the median and *min-max* the fastest and slowest
  rep (other jobs only ever add time: a wide range marks a disturbed row). *time / none* =
  median / the none row's median at the same T and CP.
- **Longest T in the budget** (per rank), two ways. *planner*: for each policy and c, the
  largest T, a multiple of 2 c x 64, with `activation_bytes(shape)["total"] +
  static_bytes(shape)["total"]` (parameters, gradients, AdamW state, not sharded: ZeRO off,
  no DP) within the budget; the model is linear in T/c (no T^2 term: the attention backends
  keep O(T/c) per rank), so only the static bytes keep a policy's gain below its per-token
  ratio. *measured*: the same search on the measured peak, extrapolated linearly through the
  two longest measured T (the peaks grow linearly in T here), plus the parameters and AdamW
  state (the gradients are in the peak). *x baseline* = that T / none's at CP=1, each kind
  against its own. One point is checked by measurement when cheap: int8+full at CP=2 at its
  planner T runs one step at the end of the memory pass if its time, extrapolated
  quadratically from the longest measured T, stays under 60 s; its measured total is the
  peak plus the parameters and AdamW state.
"""


@dataclass
class Row:
    length: int
    cp: int
    policy: str
    # bytes saved for the backward by the last forward (largest rank)
    saved_bytes: Optional[int] = None
    # the planner's layers + final for the same shape
    model_saved_bytes: Optional[float] = None
    # peak RSS increase of one step (largest rank), MiB, memory pass
    peak_mib: Optional[float] = None
    # the planner's activation total + gradients, bytes
    model_peak_bytes: Optional[float] = None
    # median fwd+bwd seconds over reps (slowest rank per rep)
    time_s: Optional[float] = None
    time_range_s: Optional[tuple[float, float]] = None
    # the memory pass's step time (pinned heap: slower), for the verification's estimate
    memory_pass_s: Optional[float] = None
    error: Optional[str] = None


@dataclass
class Check:
    """One step of int8+full at CP=2 at the longest T the budget fits (see METHOD)."""

    length: int
    estimate_s: float
    ran: bool = False
    time_s: Optional[float] = None
    peak_mib: Optional[float] = None
    saved_bytes: Optional[int] = None
    error: Optional[str] = None


def policy_name(activations: str, checkpointing: str) -> str:
    from longtrain.memory.estimate import Policy

    return Policy(activations, checkpointing).name


def make_config(length: int, cp: int, policy: tuple[str, str] = ("none", "none"),
                max_length: int = 0) -> Any:
    from longtrain.config.schema import RunConfig

    cfg = RunConfig()
    for k, v in MODEL.items():
        setattr(cfg.model, k, v)
    cfg.model.max_position_embeddings = max(length, max_length, cfg.model.max_position_embeddings)
    cfg.data.seq_len, cfg.data.micro_batch_size, cfg.data.docs_per_seq = length, 1, 1
    cfg.parallel.world_size, cfg.parallel.cp = cp, cp
    cfg.attention.backend = "ring" if cp > 1 else "dense"
    cfg.train.precision = "fp32"
    cfg.memory.activations, cfg.memory.checkpointing = policy
    return cfg


def predicted(length: int, cp: int, policy: tuple[str, str]) -> dict[str, float]:
    """The planner's per-rank bytes: 'saved' (layers + final), 'activations' (their total),
    'grads' and 'static' (parameters, gradients, AdamW state)."""
    from longtrain.memory.estimate import Policy, Shape, activation_bytes, static_bytes

    shape = Shape.of(make_config(length, cp, policy))
    act = activation_bytes(shape, Policy(*policy))
    static = static_bytes(shape)
    return {"saved": act["layers"] + act["final"], "activations": act["total"],
            "grads": static["grads"], "static": static["total"]}


def _longest(cp: int, fits: Callable[[int], bool]) -> int:
    """The largest T, a multiple of 2 c LENGTH_BLOCK, with fits(T) (fits is monotone); 0
    when none does."""
    unit = 2 * cp * LENGTH_BLOCK
    if not fits(unit):
        return 0
    hi = 2
    while fits(hi * unit):
        hi *= 2
    lo = hi // 2  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * unit) else (lo, mid)
    return lo * unit


def longest_fit(cp: int, policy: tuple[str, str], budget_bytes: float) -> int:
    """The largest T whose predicted per-rank total (planner) fits the budget."""
    def fits(length: int) -> bool:
        need = predicted(length, cp, policy)
        return need["activations"] + need["static"] <= budget_bytes

    return _longest(cp, fits)


def measured_fit(rows: list[Row], cp: int, policy: tuple[str, str], budget_bytes: float
                 ) -> Optional[int]:
    """The largest T whose measured per-rank total fits the budget: the step's peak, linear
    in T through the two longest measured T, plus the parameters and AdamW state (the
    gradients are in the peak); None without two measured lengths."""
    name = policy_name(*policy)
    pts = sorted((r.length, r.peak_mib * MIB) for r in rows
                 if r.cp == cp and r.policy == name and r.peak_mib is not None)
    if len(pts) < 2:
        return None
    (t1, p1), (t2, p2) = pts[-2:]
    slope = (p2 - p1) / (t2 - t1)
    need = predicted(t2, cp, policy)
    resident = need["static"] - need["grads"]
    return _longest(cp, lambda length: p2 + slope * (length - t2) + resident <= budget_bytes)


def _inputs(runtime: Any, length: int) -> tuple[torch.Tensor, ...]:
    """This rank's shard of seeded random tokens, their labels and positions."""
    from longtrain.parallel.layout import split_for_cp

    seq = torch.randint(0, MODEL["vocab_size"], (1, length + 1),
                        generator=torch.Generator().manual_seed(length))
    cp, rank = runtime.dims.cp, runtime.cp_rank
    return tuple(split_for_cp(x, cp_size=cp, cp_rank=rank, dim=1).contiguous()
                 for x in (seq[:, :-1], seq[:, 1:], torch.arange(length)[None]))


def _steps(runtime: Any, model: Any, stores: dict[str, Any], length: int,
           saved: dict[str, int]) -> dict[str, Callable[[], None]]:
    """A fwd+bwd callable per policy at `length`; each records its saved bytes in `saved`."""
    from longtrain.memory.apply import apply_memory_policy
    from longtrain.train.loop import attention_context
    from longtrain.train.loss import token_loss_sum

    tokens, labels, positions = _inputs(runtime, length)
    ctx = attention_context(runtime)
    params = list(model.parameters())

    def step_of(name: str, store: Any, checkpointing: str) -> Callable[[], None]:
        def step() -> None:
            apply_memory_policy(model, store, checkpointing)
            logits = model(tokens, positions_bt=positions, seq_len=length, ctx=ctx)
            saved[name] = store.stats.device_bytes
            token_loss_sum(logits, labels).backward()
            for p in params:
                p.grad = None

        return step

    return {name: step_of(name, store, ck) for name, (store, ck) in stores.items()}


def _max_over_ranks(x: float) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _worker(runtime: Any, lengths: list[int], reps: int, check_length: int,
            result_path: str) -> None:
    from longtrain.memory import store_for
    from longtrain.train.loop import build_model

    _pin_mmap_threshold()
    cp = runtime.dims.cp
    if cp == 1:  # alone on the machine: every core
        torch.set_num_threads(os.cpu_count() or 1)
    cfg = make_config(lengths[0], cp, max_length=max(lengths + [check_length]))
    model = build_model(cfg, runtime)
    model.train()
    stores = {}
    for policy in POLICIES:
        memory = dataclasses.replace(cfg.memory, activations=policy[0], checkpointing=policy[1])
        stores[policy_name(*policy)] = (store_for(memory, model.parameters()), policy[1])
    rows = {(n, name): Row(n, cp, name) for n in lengths for name in stores}
    saved: dict[str, int] = {}
    # warm-up: first-call costs (imports, thread pools, gloo buffers) stay out of the figures
    steps = _steps(runtime, model, stores, lengths[0], saved)
    for name in list(steps):
        error = None
        try:
            steps[name]()
        except Exception as exc:  # noqa: BLE001 - reported as a table row
            error = exc
        why = _agreed_error(error)
        if why is not None:
            for n in lengths:
                rows[(n, name)].error = why
            del stores[name]
    # the objects of the imports and the model: every rep's gc.collect (in _timed) would
    # otherwise walk them all (a quarter of a second here)
    gc.freeze()
    try:
        rows_out, check = _measure(runtime, model, stores, rows, lengths, reps, check_length)
    finally:
        gc.unfreeze()
    if runtime.rank == 0:
        with open(result_path, "w") as f:
            json.dump({"rows": rows_out, "check": None if check is None else asdict(check)}, f)


def _measure(runtime: Any, model: Any, stores: dict[str, Any], rows: dict[tuple[int, str], Row],
             lengths: list[int], reps: int, check_length: int
             ) -> tuple[list[dict[str, Any]], Optional[Check]]:
    """The memory pass, the measured check and the timing pass (see METHOD)."""
    cp = runtime.dims.cp
    saved: dict[str, int] = {}
    # memory pass (heap pinned)
    for n in lengths:
        for name, step in _steps(runtime, model, stores, n, saved).items():
            seconds, peak = _timed(step)
            row = rows[(n, name)]
            row.peak_mib, row.memory_pass_s = peak, seconds
            row.saved_bytes = round(_max_over_ranks(saved[name]))
    check = None
    if check_length and "int8+full" in stores:
        base = rows[(max(lengths), "int8+full")]
        check = Check(check_length, base.memory_pass_s * (check_length / base.length) ** 2)
        if check.estimate_s <= VERIFY_LIMIT_S:
            step = _steps(runtime, model, {"int8+full": stores["int8+full"]}, check_length,
                          saved)["int8+full"]
            error, result = None, None
            try:
                result = _timed(step)
            except Exception as exc:  # noqa: BLE001 - reported in the verdict
                error = exc
            check.error = _agreed_error(error)
            if result is not None and check.error is None:
                check.ran = True
                check.time_s, check.peak_mib = result
                check.saved_bytes = round(_max_over_ranks(saved["int8+full"]))
    if runtime.rank == 0:
        print(f"  CP={cp} memory pass done", flush=True)
    # timing pass (steady heap)
    _steady_heap()
    for n in lengths:
        steps = _steps(runtime, model, stores, n, saved)
        for step in steps.values():  # a warm-up in this heap regime, at this length
            _timed(step)
        times: dict[str, list[float]] = {name: [] for name in steps}
        time_rotating(steps, times, reps=reps)
        for name, ts in times.items():
            rows[(n, name)].time_s = statistics.median(ts)
            rows[(n, name)].time_range_s = (min(ts), max(ts))
        if runtime.rank == 0:
            print(f"  CP={cp} T={n} done", flush=True)
    return [asdict(r) for r in rows.values()], check


def run_world(cp: int, lengths: list[int], reps: int, check_length: int = 0
              ) -> tuple[list[Row], Optional[Check]]:
    """Every policy at every length in one world of `cp` processes (CP=1: 1 process x every
    core; else `cp` x 1 thread)."""
    got, why = run_in_world(_worker, (lengths, reps, check_length), cp=cp)
    if why is not None:
        return [Row(n, cp, policy_name(*p), error=why) for n in lengths for p in POLICIES], None
    rows = [Row(**r) for r in got["rows"]]
    for r in rows:
        policy = next(p for p in POLICIES if policy_name(*p) == r.policy)
        need = predicted(r.length, cp, policy)
        r.model_saved_bytes = need["saved"]
        r.model_peak_bytes = need["activations"] + need["grads"]
    return rows, None if got["check"] is None else Check(**got["check"])


def _find(rows: list[Row], length: int, cp: int, policy: str) -> Optional[Row]:
    return next((r for r in rows if (r.length, r.cp, r.policy) == (length, cp, policy)), None)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or not b else a / b


def _policy_order(name: str) -> int:
    return [policy_name(*p) for p in POLICIES].index(name)


def table(rows: list[Row]) -> str:
    head = ("| T | CP | policy | saved MiB/rank | model MiB/rank | model / saved | saved / none "
            "| peak MiB/rank | model peak MiB/rank | step s | min-max s | time / none |")
    lines = [head, "|" + "---|" * 12]
    for r in sorted(rows, key=lambda r: (r.length, r.cp, _policy_order(r.policy))):
        if r.error is not None or r.time_s is None:
            lines.append(f"| {r.length} | {r.cp} | {r.policy} | n/a ({r.error}) |"
                         + " |" * 8)
            continue
        none = _find(rows, r.length, r.cp, "none")
        lo, hi = r.time_range_s
        lines.append(
            f"| {r.length} | {r.cp} | {r.policy} | {r.saved_bytes / MIB:.1f} "
            f"| {r.model_saved_bytes / MIB:.1f} "
            f"| {_fmt_ratio(_ratio(r.model_saved_bytes, r.saved_bytes))} "
            f"| {_fmt_ratio(_ratio(r.saved_bytes, none and none.saved_bytes))} "
            f"| {r.peak_mib:.1f} | {r.model_peak_bytes / MIB:.1f} | {r.time_s:.3f} "
            f"| {lo:.3f}-{hi:.3f} | {_fmt_ratio(_ratio(r.time_s, none and none.time_s))} |")
    return "\n".join(lines)


# (policy name, c) -> {"planner": longest T, "measured": longest T or None}
Fits = dict[tuple[str, int], dict[str, Optional[int]]]


def fits_of(rows: list[Row], budget_mib: float) -> Fits:
    return {(policy_name(*p), c): {"planner": longest_fit(c, p, budget_mib * MIB),
                                   "measured": measured_fit(rows, c, p, budget_mib * MIB)}
            for p in POLICIES for c in CPS}


def fit_table(fits: Fits) -> str:
    base = fits[("none", 1)]
    kinds = ("planner", "measured")
    head = "| policy | " + " | ".join(f"CP={c} {k} T | x baseline" for c in CPS
                                     for k in kinds) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(CPS) * len(kinds))]
    for p in POLICIES:
        name = policy_name(*p)
        cells = [f"{'-' if fits[(name, c)][k] is None else fits[(name, c)][k]} "
                 f"| {_fmt_ratio(_ratio(fits[(name, c)][k], base[k]))}"
                 for c in CPS for k in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:+.0f}%"


def _int8_verdict(rows: list[Row]) -> str:
    parts, missed = [], []
    for n, cp in sorted({(r.length, r.cp) for r in rows}, key=lambda k: (k[1], k[0])):
        none, int8 = _find(rows, n, cp, "none"), _find(rows, n, cp, "int8")
        if None in (none, int8) or none.time_s is None or int8.time_s is None:
            continue
        cut = 1 - int8.saved_bytes / none.saved_bytes
        over = int8.time_s / none.time_s - 1
        # load from other processes only ever adds time: the fastest reps are the cleanest pair
        fastest = int8.time_range_s[0] / none.time_range_s[0] - 1
        parts.append(f"T={n} CP={cp} cut {100 * cut:.0f}%, time {_pct(over)} "
                     f"(fastest reps {_pct(fastest)})")
        if cut < TARGET_CUT or over > TARGET_OVERHEAD:
            missed.append(f"T={n} CP={cp}")
    target = (f"int8 vs none: activation-memory cut >= {100 * TARGET_CUT:.0f}% at step-time "
              f"overhead <= {100 * TARGET_OVERHEAD:.0f}%")
    if not parts:
        return f"{target}: not judged (no measurement)."
    met = "met at every measured T and CP" if not missed else f"NOT met at {', '.join(missed)}"
    return f"{target}: {met}; " + "; ".join(parts) + "."


def _fit_verdict(fits: Fits, budget_mib: float) -> str:
    parts = []
    for kind, how in (("planner", "planner"), ("measured", "from the measured peaks, linear "
                                                          "through the two longest T")):
        base, best = fits[("none", 1)][kind], fits[("int8+full", CP)][kind]
        ratio = _ratio(best, base)
        text = f"{how}: none CP=1 T={base}, int8+full CP={CP} T={best}"
        if ratio is None:
            text += ", not judged"
        else:
            text += f" = {ratio:.2f}x: {'met' if ratio >= TARGET_FIT else 'NOT met'}"
        parts.append(text)
    return (f"Longest sequence in {budget_mib:g} MiB per rank, int8+full at CP={CP} vs none at "
            f"CP=1 (target >= {TARGET_FIT:g}x): " + "; ".join(parts) + ".")


def _check_verdict(check: Optional[Check], budget_mib: float) -> str:
    if check is None:
        return f"Measured check of int8+full CP={CP} at its longest T: not run (no measurement)."
    what = f"Measured check of int8+full CP={CP} at T={check.length}"
    if check.error:
        return f"{what}: failed ({check.error})."
    if not check.ran:
        return (f"{what}: skipped, one step would take about {check.estimate_s:.0f} s "
                f"(extrapolated quadratically from the longest measured T; limit "
                f"{VERIFY_LIMIT_S:.0f} s); the measured columns above check the per-token "
                f"model instead.")
    need = predicted(check.length, CP, ("int8", "full"))
    # the gradients are in the measured peak; the parameters and AdamW state are not
    resident = (need["static"] - need["grads"]) / MIB
    total = check.peak_mib + resident
    fits = "fits" if total <= budget_mib else "does NOT fit"
    return (f"{what}: {fits}, measured peak {check.peak_mib:.1f} MiB + parameters and AdamW "
            f"state {resident:.1f} MiB = {total:.1f} of {budget_mib:g} MiB (planner "
            f"{(need['activations'] + need['static']) / MIB:.1f}); saved "
            f"{check.saved_bytes / MIB:.1f} MiB (planner {need['saved'] / MIB:.1f}); step "
            f"{check.time_s:.1f} s.")


def _recompute_verdict(rows: list[Row]) -> str:
    parts = []
    for name in ("selective", "full", "int8+selective", "int8+full"):
        each = []
        for n, cp in sorted({(r.length, r.cp) for r in rows}, key=lambda k: (k[1], k[0])):
            r, none = _find(rows, n, cp, name), _find(rows, n, cp, "none")
            ratio = _ratio(r and r.time_s, none and none.time_s)
            if ratio is not None:
                each.append(f"T={n} CP={cp} {_pct(ratio - 1)}")
        if each:
            parts.append(f"{name} " + ", ".join(each))
    return ("Recompute overhead (median step time vs none): "
            + ("; ".join(parts) if parts else "no measurement") + ".")


def _model_verdict(rows: list[Row]) -> str:
    parts = []
    for cp in CPS:
        errs = [r.model_saved_bytes / r.saved_bytes - 1 for r in rows
                if r.cp == cp and r.saved_bytes]
        peaks = [r.peak_mib / (r.model_peak_bytes / MIB) for r in rows
                 if r.cp == cp and r.peak_mib and r.model_peak_bytes]
        if errs:
            parts.append(f"CP={cp}: model / saved {1 + min(errs):.3f}-{1 + max(errs):.3f}, "
                         f"measured peak / model peak {min(peaks):.2f}-{max(peaks):.2f}")
    return ("Activation model vs measurement: " + ("; ".join(parts) if parts else
                                                    "no measurement") + ".")


def verdict(rows: list[Row], fits: Fits, check: Optional[Check],
            budget_mib: float) -> list[str]:
    return [_int8_verdict(rows), _fit_verdict(fits, budget_mib), _check_verdict(check, budget_mib),
            _recompute_verdict(rows), _model_verdict(rows)]


def section(rows: list[Row], fits: Fits, check: Optional[Check], *,
            reps: int, budget_mib: float, command: str) -> str:
    m = MODEL
    parts = [
        f"Measured {datetime.date.today().isoformat()} on {machine()}; model {m['num_layers']} "
        f"layers x {m['hidden_size']}, {m['num_heads']} heads ({m['num_kv_heads']} K/V), "
        f"SwiGLU {m['intermediate_size']}, vocabulary {m['vocab_size']}, fp32, micro-batch 1; "
        f"median of {reps} rep{'s' if reps > 1 else ''} after a warm-up. CP=1 = 1 process x "
        f"{os.cpu_count()} threads (dense attention); CP={CP} = {CP} processes x 1 thread over "
        f"gloo (ring attention).",
        f"```\n{command}\n```",
        table(rows),
        f"Longest T whose per-rank total fits {budget_mib:g} MiB: *planner* = predicted "
        f"activations, logits, parameters, gradients and AdamW state; *measured* = the "
        f"measured step peak, extrapolated linearly in T, plus parameters and AdamW state:",
        fit_table(fits),
    ]
    return join_section(parts, verdict(rows, fits, check, budget_mib), METHOD)


def main(argv: Optional[list[str]] = None) -> list[Row]:
    p = argument_parser(__doc__, METHOD)
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)),
                   help=f"comma-separated global sequence lengths (multiples of 2*CP = {2 * CP})")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--budget-mib", type=float, default=None,
                   help=f"per-rank memory budget for the longest-sequence table (default "
                        f"{BUDGET_MIB:g}; --quick: {QUICK_BUDGET_MIB:g}, where the measured "
                        f"check is cheap)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: lengths {QUICK_LENGTHS}, 1 rep, budget {QUICK_BUDGET_MIB:g} "
                        f"MiB")
    add_output_args(p)
    args = p.parse_args(argv)

    lengths = list(QUICK_LENGTHS) if args.quick else [int(x) for x in args.lengths.split(",")]
    reps = 1 if args.quick else args.reps
    budget_mib = args.budget_mib or (QUICK_BUDGET_MIB if args.quick else BUDGET_MIB)
    odd = [n for n in lengths if n <= 0 or n % (2 * CP)]
    if odd:
        raise ValueError(f"--lengths {odd} are not positive multiples of 2*CP = {2 * CP}")
    if reps < 1 or budget_mib <= 0:
        raise ValueError(f"--reps={reps} must be >= 1 and --budget-mib={budget_mib} > 0")

    check_length = longest_fit(CP, ("int8", "full"), budget_mib * MIB)
    # the children inherit it: megatron's import-time notes about Transformer Engine / Apex
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    rows, _ = run_world(1, lengths, reps)
    more, check = run_world(CP, lengths, reps, check_length=check_length)
    rows += more
    fits = fits_of(rows, budget_mib)

    print(f"# {machine()}")
    print(table(rows))
    print()
    print(fit_table(fits))
    print("\n".join(verdict(rows, fits, check, budget_mib)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows],
                       "fits": [{"policy": k[0], "cp": k[1], **v} for k, v in fits.items()],
                       "check": None if check is None else asdict(check)}, f)
    if args.out:
        command = command_line("benchmarks.memory", argv)
        replace_section(args.out, "memory", TITLE,
                        section(rows, fits, check, reps=reps, budget_mib=budget_mib,
                                command=command))
        print(f"section written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
