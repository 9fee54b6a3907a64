"""The prepared GPU check: what every session lent a device runs first, in one call.

    bash benchmarks/gpu_check.sh            # = python -m benchmarks.gpu_check (+ paths)
    python -m benchmarks.gpu_check --json $OUT/gpu_check.json --md $OUT/gpu_check.md
    python -m benchmarks.gpu_check --render-from gpu_check.json --benchmarks BENCHMARKS.md

Parts, in order, each in its own process under a hard time budget (the process is killed at
its budget; the rows it wrote before that are kept), all within `--total-s` (8 minutes by
default; a part that cannot get `MIN_PART_S` is skipped, said as such):

- gpu_tests: `pytest -q -m gpu tests/`;
- attention: our Triton flash kernel (the ring's per-block kernel) vs torch SDPA's cuDNN and
  flash backends, causal fwd+bwd, bf16, T 8K / 16K / 32K, MHA 32/32 and GQA 32/8, D=128;
- train: the `1b` preset on one GPU at 8K and 32K tokens, bf16, train.compile on and off:
  tokens/s, MFU against the datasheet peak, peak memory against the planner's estimate;
- baseline: the same shapes as transformers' LlamaForCausalLM with SDPA and torch.compile
  (a plain PyTorch Llama with SDPA and compile where transformers is not installed, said so).

Nothing is downloaded: models are built from their configs with random weights. The results
go to a JSON file and a markdown section naming the device; on the device machine only
$OUT comes back, so `--render-from` writes that JSON's section into BENCHMARKS.md here.
The GPU work itself is in `benchmarks.gpu_check_parts`; this module (budget, processes,
tables, verdicts) runs anywhere and is tested on CPU with fake parts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from benchmarks.report import replace_section

# the whole check, seconds (one H100 call must hold it with room to spare)
TOTAL_S = 480.0
# a part offered less than this is skipped rather than started
MIN_PART_S = 20.0
SECTION_KEY = "gpu_check"
# targets of issue 24, judged from one run
TARGET_MFU_32K = 0.50
TARGET_VS_BASELINE = 1.1
TARGET_KERNEL_VS_CUDNN = 1.0


@dataclass(frozen=True)
class Part:
    name: str
    budget_s: float
    title: str


PARTS = (
    Part("gpu_tests", 120.0, "GPU tests (pytest -m gpu)"),
    Part("attention", 70.0, "Attention kernels, causal fwd+bwd, bf16, D=128"),
    Part("train", 180.0, "1b preset, one GPU, bf16"),
    Part("baseline", 90.0, "Baseline Llama, SDPA + torch.compile, bf16"),
)


# the parts that cannot run at all without CUDA (the GPU tests skip themselves)
NEEDS_CUDA = {"attention", "train", "baseline"}


@dataclass
class PartResult:
    name: str
    # ok | timed out | failed | skipped
    status: str
    seconds: float = 0.0
    detail: str = ""
    rows: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- the budget

class Deadline:
    """Seconds left of a part's budget, for the part's own loop to skip the cases that can
    no longer start (the hard limit is the process's timeout)."""

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.end = clock() + seconds

    def left(self) -> float:
        return self.end - self.clock()


class RowWriter:
    """A part's rows as JSON lines, flushed one by one so a killed part keeps what it did."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def skip(self, case: dict, reason: str) -> None:
        self.write({**case, "skipped": reason})


def read_rows(path: str) -> list[dict]:
    """The rows a part wrote (a torn last line, from a kill mid-write, is dropped)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


Launch = Callable[[Part, float, str], tuple[str, str]]


def subprocess_launch(command: list[str]) -> Launch:
    """Runs a part as `command + [--part NAME --rows PATH --deadline-s S]`, killed after its
    timeout: (status, detail)."""

    def launch(part: Part, timeout_s: float, rows_path: str) -> tuple[str, str]:
        argv = [*command, "--part", part.name, "--rows", rows_path,
                "--deadline-s", f"{timeout_s:.1f}"]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return "timed out", f"killed at its budget of {timeout_s:.0f} s"
        if res.returncode != 0:
            tail = (res.stderr.strip() or res.stdout.strip()).splitlines()
            return "failed", f"exit {res.returncode}: {tail[-1][:300] if tail else ''}"
        return "ok", ""

    return launch


def run_parts(parts: tuple[Part, ...] | list[Part], *, total_s: float, launch: Launch,
              rows_dir: str, clock: Callable[[], float] = time.monotonic,
              log: Callable[[str], None] = lambda line: None) -> list[PartResult]:
    """Each part in turn, given min(its budget, what is left of `total_s`); a part offered
    less than MIN_PART_S is skipped. Rows come from `<rows_dir>/<part>.jsonl`."""
    start = clock()
    results = []
    for part in parts:
        left = total_s - (clock() - start)
        if left < MIN_PART_S:
            results.append(PartResult(part.name, "skipped",
                                      detail=f"time budget spent ({max(left, 0):.0f} s of "
                                             f"{total_s:.0f} s left)"))
            log(f"{part.name}: skipped, time budget spent")
            continue
        timeout = min(part.budget_s, left)
        rows_path = os.path.join(rows_dir, f"{part.name}.jsonl")
        if os.path.exists(rows_path):
            os.remove(rows_path)
        log(f"{part.name}: up to {timeout:.0f} s")
        t0 = clock()
        status, detail = launch(part, timeout, rows_path)
        results.append(PartResult(part.name, status, clock() - t0, detail, read_rows(rows_path)))
        log(f"{part.name}: {status} in {clock() - t0:.0f} s {detail}")
    return results


# ----------------------------------------------------------------------------- the report

def _f(x: Any, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def _why(row: dict) -> Optional[str]:
    return row.get("skipped") or row.get("error")


def render_gpu_tests(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        out.append(f"pytest -m gpu: exit {r.get('rc')}; {r.get('summary', '')}")
    return out


def _rows(rows: list[dict], head: Callable[[dict], str], body: Callable[[dict], str],
          blanks: int) -> list[str]:
    """Table rows: `head(r)`, then `body(r)`, or the reason a row has no figures and `blanks`
    empty cells."""
    out = []
    for r in rows:
        why = _why(r)
        out.append(f"{head(r)} {why} |" + " |" * blanks if why else f"{head(r)} {body(r)}")
    return out


def render_attention(rows: list[dict]) -> list[str]:
    return ["| T | Hq/Hkv | kernel | fwd+bwd (ms) | TFLOP/s | / cuDNN |",
            "| ---: | ---: | --- | ---: | ---: | ---: |"] + _rows(
        rows, lambda r: f"| {r['t']} | {r['heads']}/{r['kv_heads']} | {r['impl']} |",
        lambda r: (f"{r['seconds'] * 1e3:.2f} | {r['tflops']:.0f} | "
                   f"{_f(r.get('vs_cudnn'), '.2f')} |"), blanks=2)


def render_train(rows: list[dict]) -> list[str]:
    return ["| model | T | compile | tokens/s | step (s) | MFU (spec peak) | MFU vs GEMM | "
            "peak mem (GiB) | planner estimate (GiB) |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"] + _rows(
        rows, lambda r: f"| {r['model']} | {r['t']} | {'on' if r['compile'] else 'off'} |",
        lambda r: (f"{r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {r['mfu']:.1%} | "
                   f"{_f(r.get('mfu_vs_gemm'), '.1%')} | {_f(r.get('mem_peak_gib'), '.1f')} | "
                   f"{_f(r.get('mem_estimate_gib'), '.1f')} |"), blanks=5)


def render_baseline(rows: list[dict]) -> list[str]:
    return ["| implementation | T | tokens/s | step (s) | MFU (spec peak) | peak mem (GiB) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"] + _rows(
        rows, lambda r: f"| {r['impl']} | {r['t']} |",
        lambda r: (f"{r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {r['mfu']:.1%} | "
                   f"{_f(r.get('mem_peak_gib'), '.1f')} |"), blanks=3)


RENDER = {"gpu_tests": render_gpu_tests, "attention": render_attention,
          "train": render_train, "baseline": render_baseline}


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not _why(r)]


def verdicts(results: list[PartResult]) -> list[str]:
    """The issue's targets, judged from this run's rows (not measured: said so)."""
    by = {r.name: _ok(r.rows) for r in results}
    out = []
    kernel = [r for r in by.get("attention", []) if r["impl"].startswith("ours")
              and r.get("vs_cudnn") is not None]
    if kernel:
        worst = max(kernel, key=lambda r: r["vs_cudnn"])
        met = "met" if worst["vs_cudnn"] <= TARGET_KERNEL_VS_CUDNN else "NOT met"
        out.append(f"our block kernel vs cuDNN SDPA (target <= {TARGET_KERNEL_VS_CUDNN:.1f}x): "
                   f"worst {worst['vs_cudnn']:.2f}x at T={worst['t']}, "
                   f"{worst['heads']}/{worst['kv_heads']} heads: {met}")
    else:
        out.append("our block kernel vs cuDNN SDPA: not measured")
    long = [r for r in by.get("train", []) if r["t"] >= 32768]
    if long:
        best = max(long, key=lambda r: r["mfu"])
        met = "met" if best["mfu"] >= TARGET_MFU_32K else "NOT met"
        out.append(f"1b at T={best['t']} MFU (spec peak, target >= {TARGET_MFU_32K:.0%}): "
                   f"{best['mfu']:.1%} (compile {'on' if best['compile'] else 'off'}): {met}")
        base = [r for r in by.get("baseline", []) if r["t"] == best["t"]]
        if base:
            ratio = best["tokens_per_s"] / base[0]["tokens_per_s"]
            met = "met" if ratio >= TARGET_VS_BASELINE else "NOT met"
            out.append(f"1b at T={best['t']} vs {base[0]['impl']} (target >= "
                       f"{TARGET_VS_BASELINE:.1f}x tokens/s): {ratio:.2f}x: {met}")
        else:
            out.append(f"1b at T={best['t']} vs the baseline: baseline not measured")
    else:
        out.append("1b at 32K: not measured")
    return out


def render(results: list[PartResult], *, device: str, meta: dict) -> str:
    """The markdown section: the device, each part's status and table, the verdicts."""
    lines = [f"Device: **{device}**; torch {meta.get('torch', '?')}; "
             f"{meta.get('date', '?')}; peak for MFU: {meta.get('peak', '?')}.", "",
             "| part | status | seconds | detail |", "| --- | --- | ---: | --- |"]
    for r in results:
        detail = r.detail.replace("|", "/")
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {detail} |")
    titles = {p.name: p.title for p in PARTS}
    for r in results:
        if not r.rows:
            continue
        lines += ["", f"**{titles.get(r.name, r.name)}**", ""]
        lines += RENDER.get(r.name, lambda rows: [json.dumps(x) for x in rows])(r.rows)
    lines += ["", *[f"- **{v}**" for v in verdicts(results)], "",
              "Command: `bash benchmarks/gpu_check.sh` (see `benchmarks/gpu_check.py`)."]
    return "\n".join(lines)


def write_outputs(results: list[PartResult], *, device: str, meta: dict,
                  json_path: Optional[str], md_path: Optional[str],
                  benchmarks_path: Optional[str]) -> str:
    body = render(results, device=device, meta=meta)
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump({"device": device, "meta": meta,
                       "parts": [asdict(r) for r in results]}, f, indent=1)
    title = f"GPU check on {device}"
    if md_path:
        os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
        with open(md_path, "w") as f:
            f.write(f"## {title}\n\n{body}\n")
    if benchmarks_path:
        replace_section(benchmarks_path, SECTION_KEY, title, body)
    return body


def load_results(path: str) -> tuple[list[PartResult], str, dict]:
    with open(path) as f:
        got = json.load(f)
    return [PartResult(**p) for p in got["parts"]], got["device"], got["meta"]


# ----------------------------------------------------------------------------- entry point

def _device_facts() -> tuple[str, dict]:
    import torch

    from longtrain.observability.peaks import spec_peak

    meta = {"torch": torch.__version__,
            "date": datetime.date.today().isoformat()}
    if not torch.cuda.is_available():
        return "no CUDA device", {**meta, "peak": "none"}
    name = torch.cuda.get_device_name()
    found = spec_peak(name, torch.bfloat16)
    meta["peak"] = f"{found[0]:g} TFLOP/s ({found[1]}, dense)" if found else "not in the table"
    return name, meta


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the results here (JSON)")
    p.add_argument("--md", default=None, help="write the markdown section here")
    p.add_argument("--benchmarks", default=None,
                   help="also replace the section in this BENCHMARKS.md")
    p.add_argument("--total-s", type=float, default=TOTAL_S)
    p.add_argument("--only", default=None, help="comma-separated parts (default: all)")
    p.add_argument("--render-from", default=None,
                   help="only render an earlier run's JSON into --md / --benchmarks")
    # one part, in the child process
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline-s", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.part:
        import torch

        from benchmarks.gpu_check_parts import PART_FUNCTIONS

        if args.part in NEEDS_CUDA and not torch.cuda.is_available():
            raise SystemExit(f"part {args.part} needs a CUDA device (torch {torch.__version__} "
                             f"sees none)")
        PART_FUNCTIONS[args.part](RowWriter(args.rows), Deadline(args.deadline_s or 60.0))
        return 0
    if args.render_from:
        results, device, meta = load_results(args.render_from)
        print(write_outputs(results, device=device, meta=meta, json_path=None,
                            md_path=args.md, benchmarks_path=args.benchmarks))
        return 0

    parts = PARTS
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {q.name for q in PARTS})
        if unknown:
            p.error(f"--only: unknown part(s) {unknown}; parts are {[q.name for q in PARTS]}")
        parts = tuple(q for q in PARTS if q.name in wanted)
    device, meta = _device_facts()
    rows_dir = tempfile.mkdtemp(prefix="gpu-check-")
    launch = subprocess_launch([sys.executable, "-m", "benchmarks.gpu_check"])
    results = run_parts(parts, total_s=args.total_s, launch=launch, rows_dir=rows_dir,
                        log=lambda line: print(f"gpu_check: {line}", flush=True))
    print(write_outputs(results, device=device, meta=meta, json_path=args.json,
                        md_path=args.md, benchmarks_path=args.benchmarks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
