"""The prepared GPU check's CPU-side logic (`benchmarks.gpu_check`), with the GPU parts
replaced by fakes: the time budget (parts skipped once it is spent, a part killed at its
budget keeping its rows), the tables and verdicts, the JSON / markdown outputs, re-rendering
an earlier run into BENCHMARKS.md, and the device's peak in the header."""

from __future__ import annotations

import json
import os
import sys

import pytest

from benchmarks import gpu_check as gc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_parts_get_their_budget_until_the_total_is_spent(tmp_path):
    clock = FakeClock()
    parts = [gc.Part("a", 100.0, "A"), gc.Part("b", 100.0, "B"), gc.Part("c", 100.0, "C"),
             gc.Part("d", 100.0, "D")]
    spend = {"a": 30.0, "b": 100.0, "c": 5.0, "d": 5.0}
    offered = {}

    def launch(part, timeout_s, rows_path):
        offered[part.name] = timeout_s
        gc.RowWriter(rows_path).write({"part": part.name})
        clock.now += spend[part.name]
        return ("timed out", "killed") if spend[part.name] >= timeout_s else ("ok", "")

    results = gc.run_parts(parts, total_s=150.0, launch=launch, rows_dir=str(tmp_path),
                           clock=clock)
    # a, b: their whole budgets (b spends all of it); c: what is left of the total (20 s);
    # d: 15 s left, under MIN_PART_S: skipped, not started
    assert offered == {"a": 100.0, "b": 100.0, "c": 20.0}
    assert [r.status for r in results] == ["ok", "timed out", "ok", "skipped"]
    assert results[0].rows == [{"part": "a"}] and results[0].seconds == 30.0
    assert "time budget spent (15 s of 150 s left)" in results[3].detail
    assert results[3].rows == []


def test_deadline_counts_down():
    clock = FakeClock()
    d = gc.Deadline(10.0, clock=clock)
    clock.now = 4.0
    assert d.left() == 6.0


# a fake part process: `--part NAME --rows PATH --deadline-s S` as the real one gets them
FAKE_PART = r"""
import json, sys, time
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
name = args["--part"]
with open(args["--rows"], "a") as f:
    f.write(json.dumps({"part": name, "deadline": float(args["--deadline-s"])}) + "\n")
if name == "slow":
    time.sleep(30)
if name == "boom":
    sys.exit("boom: no CUDA device")
"""


def test_subprocess_parts_are_killed_at_their_budget_and_keep_their_rows(tmp_path):
    launch = gc.subprocess_launch([sys.executable, "-c", FAKE_PART])
    parts = [gc.Part("fast", 20.0, "F"), gc.Part("slow", 2.0, "S"), gc.Part("boom", 20.0, "B")]
    results = gc.run_parts(parts, total_s=100.0, launch=launch, rows_dir=str(tmp_path))
    fast, slow, boom = results
    assert fast.status == "ok" and fast.rows == [{"part": "fast", "deadline": 20.0}]
    assert slow.status == "timed out" and slow.seconds < 10
    # the row written before the kill is kept
    assert slow.rows == [{"part": "slow", "deadline": 2.0}]
    assert boom.status == "failed" and "boom: no CUDA device" in boom.detail


def test_a_torn_last_row_is_dropped(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"b": ')
    assert gc.read_rows(str(path)) == [{"a": 1}]
    assert gc.read_rows(str(tmp_path / "none.jsonl")) == []


def _results(*, mfu_32k: float, ours_vs_cudnn: float) -> list:
    attention = [
        {"t": 8192, "heads": 32, "kv_heads": 8, "impl": "sdpa cuDNN", "seconds": 0.002,
         "tflops": 400.0, "vs_cudnn": 1.0},
        {"t": 8192, "heads": 32, "kv_heads": 8, "impl": "sdpa flash (K/V expanded)",
         "seconds": 0.0025, "tflops": 320.0, "vs_cudnn": 1.25},
        {"t": 8192, "heads": 32, "kv_heads": 8, "impl": "ours (Triton)",
         "seconds": 0.002 * ours_vs_cudnn, "tflops": 300.0, "vs_cudnn": ours_vs_cudnn},
        {"t": 32768, "heads": 32, "kv_heads": 8, "impl": "ours (Triton)",
         "skipped": "time budget"},
    ]
    train = [
        {"model": "1b", "t": 32768, "compile": True, "tokens_per_s": 30000.0, "step_s": 1.09,
         "mfu": mfu_32k, "mfu_vs_gemm": 0.7, "mem_peak_gib": 50.0, "mem_estimate_gib": 48.0},
        {"model": "1b", "t": 32768, "compile": False, "error": "OutOfMemoryError: CUDA"},
    ]
    baseline = [{"t": 32768, "impl": "transformers LlamaForCausalLM + SDPA + compile",
                 "tokens_per_s": 25000.0, "step_s": 1.3, "mfu": 0.4, "mem_peak_gib": 60.0}]
    return [gc.PartResult("gpu_tests", "ok", 50.0, "", [{"rc": 0, "summary": "9 passed"}]),
            gc.PartResult("attention", "ok", 60.0, "", attention),
            gc.PartResult("train", "timed out", 180.0, "killed at its budget of 180 s", train),
            gc.PartResult("baseline", "skipped", 0.0, "time budget spent (3 s of 480 s left)",
                          baseline)]


def test_tables_and_verdicts_name_the_device_and_judge_the_targets():
    meta = {"torch": "2.x", "date": "2026-12-01", "peak": "989 TFLOP/s (H100 SXM bf16, dense)"}
    text = gc.render(_results(mfu_32k=0.52, ours_vs_cudnn=0.9), device="NVIDIA H100 80GB HBM3",
                     meta=meta)
    assert "Device: **NVIDIA H100 80GB HBM3**" in text and "989 TFLOP/s" in text
    assert "| train | timed out | 180 | killed at its budget of 180 s |" in text
    assert "| 32768 | 32/8 | ours (Triton) | time budget | | |" in text
    assert "| 8192 | 32/8 | ours (Triton) | 1.80 | 300 | 0.90 |" in text
    assert "| 1b | 32768 | on | 30,000 | 1.090 | 52.0% | 70.0% | 50.0 | 48.0 |" in text
    assert "| 1b | 32768 | off | OutOfMemoryError: CUDA |" in text
    assert "pytest -m gpu: exit 0; 9 passed" in text
    assert "target <= 1.0x): worst 0.90x at T=8192, 32/8 heads: met" in text
    assert "MFU (spec peak, target >= 50%): 52.0% (compile on): met" in text
    assert "(target >= 1.1x tokens/s): 1.20x: met" in text

    text = gc.render(_results(mfu_32k=0.41, ours_vs_cudnn=1.3), device="X", meta=meta)
    assert "worst 1.30x at T=8192, 32/8 heads: NOT met" in text
    assert "41.0% (compile on): NOT met" in text
    empty = gc.render([gc.PartResult("train", "skipped", 0.0, "time budget spent")],
                      device="X", meta=meta)
    assert "1b at 32K: not measured" in empty and "kernel vs cuDNN SDPA: not measured" in empty


def test_outputs_and_rendering_an_earlier_run_into_benchmarks_md(tmp_path):
    meta = {"torch": "2.x", "date": "2026-12-01", "peak": "989"}
    results = _results(mfu_32k=0.52, ours_vs_cudnn=0.9)
    js, md = tmp_path / "out" / "gpu_check.json", tmp_path / "out" / "gpu_check.md"
    gc.write_outputs(results, device="NVIDIA H100 80GB HBM3", meta=meta, json_path=str(js),
                     md_path=str(md), benchmarks_path=None)
    saved = json.loads(js.read_text())
    assert saved["device"] == "NVIDIA H100 80GB HBM3"
    assert [p["name"] for p in saved["parts"]] == ["gpu_tests", "attention", "train", "baseline"]
    assert md.read_text().startswith("## GPU check on NVIDIA H100 80GB HBM3")

    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# Benchmarks\n\nkept text\n")
    assert gc.main(["--render-from", str(js), "--benchmarks", str(bench)]) == 0
    text = bench.read_text()
    assert "kept text" in text and "<!-- gpu_check:begin -->" in text
    assert "## GPU check on NVIDIA H100 80GB HBM3" in text
    # rendering again replaces the section, never duplicates it
    gc.main(["--render-from", str(js), "--benchmarks", str(bench)])
    assert bench.read_text().count("<!-- gpu_check:begin -->") == 1


def test_unknown_part_is_refused():
    with pytest.raises(SystemExit):
        gc.main(["--only", "attention,warp_drive"])


def test_budget_fits_one_device_call():
    # one device command runs at most 10 minutes; the check keeps 8 with room to start
    assert gc.TOTAL_S <= 480 and sum(p.budget_s for p in gc.PARTS) <= 480
    assert {p.name for p in gc.PARTS} == {"gpu_tests", "attention", "train", "baseline"}


def test_device_header_uses_the_datasheet_peak(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    name, meta = gc._device_facts()
    assert name == "NVIDIA H100 80GB HBM3"
    assert meta["peak"] == "989 TFLOP/s (H100 SXM bf16, dense)"


def test_the_real_entry_point_on_cpu_reports_a_part_that_needs_cuda(tmp_path):
    """`main` end to end, the real part process included: on CPU the attention part fails
    (no CUDA), and the run still writes its JSON and section saying so."""
    js, md = tmp_path / "g.json", tmp_path / "g.md"
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert gc.main(["--only", "attention", "--total-s", "120", "--json", str(js),
                        "--md", str(md)]) == 0
    finally:
        os.chdir(cwd)
    part = json.loads(js.read_text())["parts"][0]
    assert part["name"] == "attention" and part["status"] == "failed"
    assert "part attention needs a CUDA device" in part["detail"]
    assert "| attention | failed |" in md.read_text()
