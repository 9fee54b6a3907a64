"""What one machine's loopback cannot show, with emulated inter-node links
(`longtrain.parallel.emulate`): LASP-2's single all-gather against LASP-1's chain of hops,
and whether ring attention's forward overlap hides the link, at CP = 4 with every rank on a
node of its own (the preset's inter-node link, stretched by how much slower this machine
computes than the preset's GPU). Prints the table and writes a section of BENCHMARKS.md.

    python -m benchmarks.emulated_links [--lengths 4096,8192] [--reps 2] [--quick]
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from benchmarks.report import add_output_args, argument_parser, command_line, publish

TITLE = "Emulated inter-node links: LASP-1 vs LASP-2, and ring's overlap, at CP=4"
CP, HEADS, HEAD_DIM = 4, 4, 64
LENGTHS, QUICK_LENGTHS = (4096, 8192), (1024,)
METHODS = ("lasp1", "lasp2", "ring")
PRESET = "h100-8x8-ib400"

METHOD = f"""\
- One world of {CP} gloo processes x 1 thread (oversubscribing this machine's 2 cores); each
  rank on a node of its own, so every message crosses the preset `{PRESET}`'s inter-node
  link (one 400 Gb/s NIC per GPU: 50 GB/s, 10 us latency).
- **Emulation** (`longtrain.parallel.emulate.emulated_links`): every message and collective
  takes at least its `collective_cost` time (latency + bytes / bandwidth, the ring
  algorithms' step counts) multiplied by the **dilation**; asynchronous ones are in flight
  from their start, so compute issued meanwhile overlaps them, and a receive that had to
  wait for its sender pays the link after the message arrives (a chain of hops pays every
  hop). The real transfer still runs, so outputs are unchanged.
- **Dilation** = the preset's achieved GEMM rate (989 TFLOP/s x 60%) over this machine's,
  measured in the world (the fastest 1024^2 fp32 GEMM interval of a rank, times cores /
  ranks for the oversubscription): links are slowed exactly as much as compute is, so the
  ratio of compute to communication is the GPU cluster's.
- Each method is one layer's attention op, forward then backward, on seeded `[1, T, {HEADS},
  {HEAD_DIM}]` fp32 inputs (as in `benchmarks.lasp`): lasp1, lasp2 (linear attention) and
  ring (softmax). One warm-up, then the reps with the methods' order rotating; each rep is
  the slowest rank's time; the table shows medians. **loopback** = without emulation,
  **link** = with it; **added** = link - loopback; **link alone** = the emulated time of
  the slowest rank's own receives and collectives if nothing overlapped them (tallied by the
  emulation; a send travels alongside its peer's receive); **hidden** (ring only: a chain's
  hops wait on one another, so LASP-1's critical path is longer than any rank's own
  receives) = 1 - added / link alone.
"""


@dataclass
class Row:
    length: int
    method: str
    loopback_s: Optional[float] = None
    link_s: Optional[float] = None
    link_alone_s: Optional[float] = None
    error: Optional[str] = None
    times: dict[str, list[float]] = field(default_factory=dict)


def _dilation(runtime: Any) -> float:
    import torch.distributed as dist

    from longtrain.observability.resources import measure_gemm_tflops
    from longtrain.parallel.emulate import dilation_for
    from longtrain.planning.cluster import PRESETS

    preset = PRESETS[PRESET]
    rate = measure_gemm_tflops(torch.device("cpu"), torch.float32)
    rate *= min(1.0, (os.cpu_count() or 1) / runtime.dims.world_size)
    mean = torch.tensor([rate], dtype=torch.float64)
    dist.all_reduce(mean)
    return dilation_for(preset.peak_tflops, preset.gemm_eff,
                        float(mean[0]) / runtime.dims.world_size)


def _link_alone(step: Any, link: Any, dilation: float) -> float:
    """The emulated seconds of every call one rep of `step` makes, summed as if nothing
    overlapped them (the slowest rank's)."""
    import torch.distributed as dist

    from longtrain.parallel.emulate import emulated_links

    tally: dict[str, float] = {}
    with emulated_links(lambda group: link, dilation=0.0, tally=tally):
        step()
    out = torch.tensor([tally.get("seconds", 0.0) * dilation], dtype=torch.float64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return float(out[0])


def _worker(runtime: Any, lengths: list[int], reps: int, path: str) -> None:
    import contextlib

    import torch.distributed as dist

    from benchmarks.attention import _fwd_bwd, _timed
    from benchmarks.lasp import _lasp_step
    from longtrain.parallel.emulate import emulated_links
    from longtrain.planning.cluster import PRESETS

    dilation = _dilation(runtime)
    link = PRESETS[PRESET].inter
    rows = []
    for length in lengths:
        gen = torch.Generator().manual_seed(length)
        shape = (1, length, HEADS, HEAD_DIM)
        q, k = (torch.nn.functional.silu(torch.randn(shape, generator=gen)) for _ in range(2))
        v, dout = (torch.randn(shape, generator=gen) for _ in range(2))
        with contextlib.ExitStack() as stack:
            steps = {m: (stack.enter_context(_fwd_bwd(runtime, m, [q, k, v, dout], True))
                         if m == "ring" else _lasp_step(runtime, m, [q, k, v, dout], HEADS))
                     for m in METHODS}
            by = {m: Row(length, m, times={"loopback": [], "link": []}) for m in METHODS}
            for m, step in steps.items():
                step()  # warm-up
                by[m].link_alone_s = _link_alone(step, link, dilation)
            for rep in range(reps):
                order = list(METHODS)[rep % len(METHODS):] + list(METHODS)[:rep % len(METHODS)]
                for m in order:
                    by[m].times["loopback"].append(_timed(steps[m])[0])
                    with emulated_links(lambda group: link, dilation=dilation):
                        by[m].times["link"].append(_timed(steps[m])[0])
            for row in by.values():
                row.loopback_s = statistics.median(row.times["loopback"])
                row.link_s = statistics.median(row.times["link"])
                rows.append(row)
        if runtime.rank == 0:
            print(f"  T={length} done", flush=True)
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump({"dilation": dilation, "rows": [asdict(r) for r in rows]}, f)


def table(rows: list[Row]) -> str:
    lines = ["| T | method | loopback s | link s | added s | link alone s | hidden |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.link_s is None:
            lines.append(f"| {r.length} | {r.method} | n/a ({r.error}) | | | | |")
            continue
        added = r.link_s - r.loopback_s
        # a chain's hops wait on each other: only ring's own transfers can hide
        hidden = (f"{1 - added / r.link_alone_s:.0%}" if r.method == "ring" and r.link_alone_s
                  else "-")
        lines.append(f"| {r.length} | {r.method} | {r.loopback_s:.2f} | {r.link_s:.2f} | "
                     f"{added:.2f} | {r.link_alone_s:.2f} | {hidden} |")
    return "\n".join(lines)


def verdicts(rows: list[Row], dilation: float) -> list[str]:
    out = [f"dilation {dilation:,.0f}x: the 50 GB/s, 10 us link behaves here as "
           f"{50e3 / dilation:,.2f} MB/s with {10e-6 * dilation * 1e3:,.0f} ms latency"]
    for length in sorted({r.length for r in rows}):
        got = {r.method: r for r in rows if r.length == length and r.link_s is not None}
        if "lasp1" in got and "lasp2" in got:
            a, b = got["lasp1"], got["lasp2"]
            out.append(f"T={length}: over the link LASP-2 takes {b.link_s / a.link_s:.2f}x "
                       f"LASP-1's time (loopback: {b.loopback_s / a.loopback_s:.2f}x); its "
                       f"added time {b.link_s - b.loopback_s:.2f} s vs LASP-1's "
                       f"{a.link_s - a.loopback_s:.2f} s")
        if "ring" in got:
            r = got["ring"]
            added = r.link_s - r.loopback_s
            out.append(f"T={length}: ring hides {1 - added / r.link_alone_s:.0%} of its "
                       f"{r.link_alone_s:.2f} s of link time behind the block compute")
    return out


def main(argv: Optional[list[str]] = None) -> list[Row]:
    from benchmarks.attention import machine, run_in_world

    p = argument_parser(__doc__, METHOD)
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_LENGTHS}, 1 rep")
    add_output_args(p)
    args = p.parse_args(argv)
    lengths = list(QUICK_LENGTHS) if args.quick else [int(x) for x in args.lengths.split(",")]
    odd = [n for n in lengths if n <= 0 or n % (2 * CP)]
    if odd or args.reps < 1:
        raise ValueError(f"--lengths {odd} must be positive multiples of {2 * CP}; "
                         f"--reps={args.reps} must be >= 1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    got, why = run_in_world(_worker, (lengths, 1 if args.quick else args.reps), cp=CP)
    if why is not None:
        raise RuntimeError(f"the emulated-link world failed: {why}")
    rows = [Row(**r) for r in got["rows"]]
    print(f"# {machine()}")
    publish(got, parts=[
        f"`{command_line('benchmarks.emulated_links', argv)}` on {machine()}.", table(rows)],
        lines=verdicts(rows, got["dilation"]), method=METHOD, key="emulated_links",
        title=TITLE, out=None if args.quick else args.out, json_path=args.json, shown=1)
    return rows


if __name__ == "__main__":
    main()
