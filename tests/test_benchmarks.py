"""The benchmark entry points run in their quick form and write their BENCHMARKS.md section
(no timing assertions: speed targets live in BENCHMARKS.md, not in tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def _run_quick(tmp_path, key: str) -> tuple[str, object]:
    """`python -m benchmarks.<key> --quick` into a BENCHMARKS.md that has other text: checks
    that it ran, kept that text and wrote its one section; returns (the file's text, the
    rows it wrote with --json)."""
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept text\n")
    rows_path = tmp_path / f"{key}.json"
    res = _run(f"benchmarks.{key}", "--quick", "--out", str(out), "--json", str(rows_path))
    assert res.returncode == 0, res.stdout + res.stderr
    text = out.read_text()
    assert "kept text" in text
    assert text.count(f"<!-- {key}:begin -->") == 1 and f"<!-- {key}:end -->" in text
    return text, json.loads(rows_path.read_text())


@pytest.mark.slow
def test_quick_benchmarks_write_their_sections(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept text\n")
    plot = tmp_path / "attention.png"
    res = _run("benchmarks.attention", "--quick", "--out", str(out), "--plot", str(plot))
    assert res.returncode == 0, res.stdout + res.stderr
    res = _run("benchmarks.data", "--quick", "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    text = out.read_text()
    assert "kept text" in text
    for key in ("attention", "data"):
        assert text.count(f"<!-- {key}:begin -->") == 1 and f"<!-- {key}:end -->" in text
    assert "| 1024 | dense |" in text and "ring CP=2" in text
    assert plot.stat().st_size > 1000


@pytest.mark.slow
def test_quick_lasp_benchmark_counts_the_bytes_sent(tmp_path):
    text, rows = _run_quick(tmp_path, "lasp")
    assert [r for r in rows if r["error"] or r["time_s"] is None] == []
    sent = {(r["method"], r["length"]): r["sent_bytes"] for r in rows}
    # CP=4, 8 heads x 64: one fp32 [H, D, D] state is 128 KiB
    state = 8 * 64 * 64 * 4
    for n in (512, 1024):
        # lasp1: one state per chain hop to another rank, forward and backward
        assert sent[("lasp1", n)] == [2 * state, 4 * state, 4 * state, 2 * state]
        # lasp2: 2 chunk states all-gathered to 3 ranks, forward and backward
        assert sent[("lasp2", n)] == [12 * state] * 4
    assert sent[("ring", 1024)] == [2 * b for b in sent[("ring", 512)]]
    assert "LASP's bytes flat in length: met" in text
    assert "equal for every row" in text


@pytest.mark.slow
def test_quick_s2_benchmark_counts_the_blocks_sent(tmp_path):
    text, rows = _run_quick(tmp_path, "s2")
    assert [r for r in rows if r["error"] or r["time_s"] is None] == []
    sent = {(r["method"], r["length"]): r["sent_bytes"] for r in rows}
    for n in (1024, 2048):
        # one chunk's K and V: 2 [T/4, 8 heads, 64] fp32
        chunk = 2 * n // 4 * 8 * 64 * 4
        # ring: its K/V shard (2 chunks) forward, again backward, and 2 dK/dV shards
        assert sent[("ring", n)] == [8 * chunk] * 2
        # 8 heads cover every vertical phase, so causality alone decides: rank 0 sends chunk 0
        # and gets chunks 1, 2 (whose gradients it returns); rank 1 the other way round
        assert sent[("s2 cp2", n)] == [3 * chunk] * 2
    assert "measured bytes vs plan: equal for every row" in text

    # 2 heads at vert_stride 8 read key blocks 3 and 7 mod 8 beyond their 4-block window: at
    # T=1024 (4 blocks of 64 per chunk) rank 1 needs blocks 1-3 of rank 0's 8 and rank 0 needs
    # blocks 7, 9, 10, 11 of rank 1's 8, one [64, 1 head, 64] fp32 K and V block = 32 KiB each
    rows_path = tmp_path / "s2_sparse.json"
    res = _run("benchmarks.s2", "--lengths", "1024", "--reps", "1", "--heads", "2",
               "--kv-heads", "1", "--out", "", "--json", str(rows_path))
    assert res.returncode == 0, res.stdout + res.stderr
    rows = json.loads(rows_path.read_text())
    assert [r for r in rows if r["error"] or r["time_s"] is None] == []
    sent = {(r["method"], r["length"]): r["sent_bytes"] for r in rows}
    assert sent[("s2 cp2", 1024)] == [(3 + 4) * 32 * 1024] * 2
    assert sent[("ring", 1024)] == [8 * (2 * 256 * 64 * 4)] * 2
    assert "planned 0.438, measured 0.438" in res.stdout


@pytest.mark.slow
def test_quick_memory_benchmark_measures_every_policy(tmp_path):
    text, got = _run_quick(tmp_path, "memory")
    rows = got["rows"]
    assert [r for r in rows if r["error"] or r["time_s"] is None or r["peak_mib"] is None] == []
    saved = {(r["policy"], r["cp"], r["length"]): r["saved_bytes"] for r in rows}
    assert len(saved) == 6 * 2 * 2
    for cp in (1, 2):
        for n in (512, 1024):
            s = {p: saved[(p, cp, n)] for p in ("none", "int8", "selective", "int8+selective",
                                                "full", "int8+full")}
            # what each policy keeps is deterministic: int8 about a quarter of fp32, and
            # recomputation keeps less, the more it recomputes
            assert s["int8"] < 0.35 * s["none"], (cp, n, s)
            assert s["none"] > s["selective"] > s["full"], (cp, n, s)
            assert s["int8"] > s["int8+selective"] > s["int8+full"], (cp, n, s)
        # the saved bytes are linear in a rank's tokens
        for p in ("int8", "full"):
            assert abs(saved[(p, cp, 1024)] - 2 * saved[(p, cp, 512)]) <= 0.02 * saved[(p, cp, 1024)]
    # CP=1 (dense attention): the planner predicts what the store counts
    for r in rows:
        if r["cp"] == 1:
            assert abs(r["model_saved_bytes"] - r["saved_bytes"]) <= 0.05 * r["saved_bytes"], r
    fits = {(f["policy"], f["cp"]): f for f in got["fits"]}
    assert fits[("int8+full", 2)]["planner"] > fits[("none", 1)]["planner"] > 0
    # the measured check of that length (at the quick budget it normally runs; whether it
    # does depends on timing, which is not asserted)
    check = got["check"]
    assert check["length"] == fits[("int8+full", 2)]["planner"] and check["error"] is None
    assert check["peak_mib"] > 0 if check["ran"] else check["estimate_s"] > 60
    assert "int8 vs none: activation-memory cut" in text and "Method:" in text
