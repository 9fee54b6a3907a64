"""The benchmark suite: every benchmark in one run, side by side, into BENCHMARKS.md.

    python -m benchmarks.run --suite quick|full [--out BENCHMARKS.md] [--only attention,e2e]

Each benchmark runs as its own process (`python -m benchmarks.<name>`, one after the other,
so none shares the cores with another) and writes its section of `--out`, its rows as JSON
and its plots; a benchmark that fails is reported and the suite goes on. Then a summary
section at the top of `--out` describes the machine, lists what ran and how long it took,
and judges the performance targets from the rows. `quick` is a smoke run (small sizes, one
rep: CI runs it, its figures are not for comparison); `full` is what BENCHMARKS.md holds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from benchmarks.report import replace_section

SUITES = ("quick", "full")


@dataclass(frozen=True)
class Bench:
    key: str
    # arguments per suite (besides --out / --json / --plot)
    quick: tuple[str, ...]
    full: tuple[str, ...]
    # it writes a plot: --plot <plots dir>/<key>.png
    plot: bool = False
    # runs only where CUDA is available
    cuda: bool = False


BENCHES = (
    Bench("attention", ("--quick",),
          ("--lengths", "4096,8192,16384", "--reps", "3", "--memory-cp", "4"), plot=True),
    Bench("e2e", ("--quick", "--layouts", "dense,ring"),
          ("--seq-len", "8192", "--models", "tiny,125m:ring", "--warmup", "1", "--steps", "2"),
          plot=True),
    Bench("memory", ("--quick",), ()),
    Bench("memory_scaling", ("--quick",), ()),
    Bench("data", ("--quick",), ()),
    Bench("lasp", ("--quick",), ("--reps", "3")),
    Bench("s2", ("--quick",), ("--reps", "3")),
    Bench("costmodel", ("--quick",), ()),
    Bench("flash_kernel", ("--lengths", "8192", "--reps", "3"),
          ("--lengths", "8192,16384,32768"), cuda=True),
)


@dataclass
class Outcome:
    key: str
    status: str
    seconds: float
    detail: str = ""


def merged_outcomes(json_dir: str, outcomes: list[Outcome]) -> list[Outcome]:
    """This run's outcomes over those of earlier runs into the same `json_dir` (an `--only`
    run keeps the other benchmarks' rows and sections, so the summary keeps them too)."""
    path = os.path.join(json_dir, "_outcomes.json")
    earlier: dict[str, Outcome] = {}
    if os.path.exists(path):
        with open(path) as f:
            earlier = {o["key"]: Outcome(**o) for o in json.load(f)}
    earlier.update({o.key: o for o in outcomes})
    merged = [earlier[b.key] for b in BENCHES if b.key in earlier]
    with open(path, "w") as f:
        json.dump([asdict(o) for o in merged], f, indent=1)
    return merged


def describe_machine() -> str:
    """CPU model and cores, memory, GPU, and the software versions."""
    from benchmarks.attention import machine

    import torch

    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    gpu = (f"; GPU: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
           if torch.cuda.is_available() else "; no GPU")
    return f"{machine()}{mem}{gpu}; {platform.system()} {platform.release()}"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_bench(b: Bench, suite: str, *, out: str, json_path: str, plots: str, timeout_s: float
              ) -> Outcome:
    args = [*(b.quick if suite == "quick" else b.full), "--out", out, "--json", json_path]
    if b.plot:
        args += ["--plot", os.path.join(plots, f"{b.key}.png")]
    cmd = [sys.executable, "-m", f"benchmarks.{b.key}", *args]
    print(f"== {b.key}: {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore::UserWarning"}
    start = time.perf_counter()
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Outcome(b.key, "timed out", time.perf_counter() - start,
                       f"no result after {timeout_s:.0f} s")
    seconds = time.perf_counter() - start
    sys.stdout.write(res.stdout)
    if res.returncode != 0:
        tail = [ln for ln in res.stderr.strip().splitlines() if ln.strip()][-1:] or ["?"]
        sys.stdout.write(res.stderr[-4000:])
        return Outcome(b.key, "failed", seconds, f"exit {res.returncode}: {tail[0][:200]}")
    return Outcome(b.key, "ok", seconds)


# ------------------------------------------------------------------------- targets


def _load(json_dir: str, key: str) -> Any:
    path = os.path.join(json_dir, f"{key}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _mfu_targets(got: Any) -> list[tuple[str, str, str]]:
    from benchmarks.e2e import TARGET_LENGTH, TARGET_MFU

    rows = [r for r in (got or {}).get("rows", []) if r["mfu"] is not None]
    out = []
    for precision in ("fp32", "bf16"):
        mine = [r for r in rows if r["precision"] == precision]
        if not mine:
            continue
        at = [r for r in mine if r["seq_len"] == TARGET_LENGTH]
        best = max(at or mine, key=lambda r: r["mfu"])
        judged = (("met" if best["mfu"] >= TARGET_MFU else "not met") if at
                  else f"not judged (T={best['seq_len']})")
        out.append((f"end-to-end MFU at T={TARGET_LENGTH}, {precision} "
                    f"(vs the {precision} GEMM peak measured in the run)",
                    f">= {TARGET_MFU:.0%}",
                    f"{best['mfu']:.1%} ({best['model']}, {best['layout']}): {judged}"))
    return out


def _attention_targets(got: Any) -> list[tuple[str, str, str]]:
    from benchmarks.attention import TARGET_LENGTH, TARGET_RATIO

    rows = [r for r in got or [] if r["time_s"] is not None]

    def at(backend: str, length: int, cp: int = 2) -> Optional[float]:
        return next((r["time_s"] for r in rows if r["backend"] == backend
                     and r["length"] == length and (backend == "dense" or r["cp"] == cp)), None)

    lengths = sorted({r["length"] for r in rows})
    if not lengths:
        return []
    n = TARGET_LENGTH if TARGET_LENGTH in lengths else lengths[-1]
    out = []
    dense, ring = at("dense", n), at("ring", n)
    if dense and ring:
        ratio = dense / ring
        got = f"not judged (T={n})" if n != TARGET_LENGTH else (
            "met" if ratio >= TARGET_RATIO else "not met")
        out.append((f"causal ring CP=2 throughput vs dense at T={TARGET_LENGTH}",
                    f">= {TARGET_RATIO}", f"{ratio:.2f}x: {got}"))
    for ours, peer in (("ring", "plain_ring"), ("ulysses", "ds_ulysses")):
        common = [m for m in lengths if at(ours, m) and at(peer, m)]
        if common:
            m = common[-1]
            out.append((f"{ours} vs {peer} (peer) throughput at T={m}, CP=2", "> 1 (report)",
                        f"{at(peer, m) / at(ours, m):.2f}x"))
    return out


def _flash_targets(got: Any) -> list[tuple[str, str, str]]:
    if not got:
        return [("Triton flash fwd+bwd vs torch SDPA, bf16, 8K-32K (GPU)", "<= 1.3x",
                 "not measured in this run: no GPU (see the flash_kernel section for the last "
                 "GPU run)")]
    worst = max(got, key=lambda r: r["ratio"])
    return [("Triton flash fwd+bwd vs torch SDPA, bf16, 8K-32K (GPU)", "<= 1.3x",
             f"worst {worst['ratio']:.2f}x at T={worst['length']}: "
             + ("met" if worst["ratio"] <= 1.3 else "not met"))]


def _costmodel_targets(got: Any) -> list[tuple[str, str, str]]:
    if not got:
        return []
    checks = [c for c in got["checks"] if c["measured_s"]]
    errs = [abs(c["predicted_s"] / c["measured_s"] - 1) for c in checks]
    out = []
    if errs:
        out.append(("cost model vs measured CP=2 attention (ring, ulysses, lasp2), this machine",
                    "report", f"mean abs error {sum(errs) / len(errs):.0%}, worst {max(errs):.0%}"))
    for r in got["cluster"]:
        if r["recommended"]:
            out.append((f"predicted, {r['model']} at {r['length'] // 1024}K on the cluster",
                        "report", f"`{r['overrides']}`: {r['step_s']:.2f} s/step, "
                        f"MFU {r['mfu']:.1%}"))
    return out


TARGETS: dict[str, Callable[[Any], list[tuple[str, str, str]]]] = {
    "e2e": _mfu_targets, "attention": _attention_targets, "flash_kernel": _flash_targets,
    "costmodel": _costmodel_targets}


def targets(json_dir: str) -> list[tuple[str, str, str]]:
    found = []
    for key, judge in TARGETS.items():
        try:
            found += judge(_load(json_dir, key))
        except (KeyError, TypeError, ValueError) as exc:
            found.append((key, "-", f"could not judge: {type(exc).__name__}: {exc}"))
    return found


def summary(outcomes: list[Outcome], found: list[tuple[str, str, str]], *, suite: str,
            command: str) -> str:
    lines = [f"Suite `{suite}`, run {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on "
             f"{describe_machine()}.", "", f"```\n{command}\n```", "",
             "| benchmark | status | wall s |", "|---|---|---|"]
    for o in outcomes:
        lines.append(f"| {o.key} | {o.status}{': ' + o.detail if o.detail else ''} "
                     f"| {o.seconds:.0f} |")
    missing = [b.key for b in BENCHES if b.key not in {o.key for o in outcomes}]
    if missing:
        lines += ["", f"Not run into this file by the suite: {', '.join(missing)}; their sections "
                      f"(if any) keep the figures of their own earlier runs, each with its date "
                      f"and command."]
    lines += ["", "| target | goal | this run |", "|---|---|---|"]
    lines += [f"| {what} | {goal} | {got} |" for what, goal, got in found]
    if suite == "quick":
        lines += ["", "A quick suite: small sizes and one rep; its figures are not for "
                      "comparison."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--suite", choices=SUITES, required=True)
    p.add_argument("--out", default="BENCHMARKS.md", help="the markdown file to write")
    p.add_argument("--only", default="",
                   help=f"comma-separated subset of {','.join(b.key for b in BENCHES)}")
    p.add_argument("--json-dir", default=None,
                   help="where the benchmarks' rows go as <name>.json (default: "
                        "benchmarks/results/<suite> next to --out)")
    p.add_argument("--plots", default=None,
                   help="where the PNG plots go (default: the benchmarks/ folder next to --out)")
    p.add_argument("--timeout-s", type=float, default=None,
                   help="per benchmark (default: 900 quick, 3600 full)")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    known = [b.key for b in BENCHES]
    if bad := [k for k in keys if k not in known]:
        p.error(f"--only has {bad}; choose from {known}")
    base = os.path.dirname(os.path.abspath(args.out))
    json_dir = args.json_dir or os.path.join(base, "benchmarks", "results", args.suite)
    plots = args.plots or os.path.join(base, "benchmarks")
    os.makedirs(json_dir, exist_ok=True)
    os.makedirs(plots, exist_ok=True)
    timeout_s = args.timeout_s or (900.0 if args.suite == "quick" else 3600.0)

    outcomes = []
    for b in BENCHES:
        if keys and b.key not in keys:
            continue
        if b.cuda and not _cuda():
            outcomes.append(Outcome(b.key, "skipped", 0.0, "needs a GPU"))
            continue
        path = os.path.join(json_dir, f"{b.key}.json")
        if os.path.exists(path):
            os.remove(path)
        outcomes.append(run_bench(b, args.suite, out=args.out, json_path=path, plots=plots,
                                  timeout_s=timeout_s))
    outcomes = merged_outcomes(json_dir, outcomes)
    found = targets(json_dir)
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    text = summary(outcomes, found, suite=args.suite, command=command)
    replace_section(args.out, "summary", "Summary", text, first=True)
    print("\n" + text)
    failed = [o.key for o in outcomes if o.status not in ("ok", "skipped")]
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
