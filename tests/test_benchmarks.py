"""The benchmark suite runs once in its quick form (`python -m benchmarks.run --suite quick`):
every benchmark writes its BENCHMARKS.md section and its rows, and the summary judges the
targets (no timing assertions: speed targets live in BENCHMARKS.md, not in tests)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory):
    """`python -m benchmarks.run --suite quick` once, into a BENCHMARKS.md that has other
    text: (the file's text, the JSON directory, the plots directory, the run's output)."""
    tmp = tmp_path_factory.mktemp("suite")
    out = tmp / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept text\n")
    res = _run("benchmarks.run", "--suite", "quick", "--out", str(out), "--json-dir",
               str(tmp / "json"), "--plots", str(tmp / "plots"))
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-6000:]
    return out.read_text(), tmp / "json", tmp / "plots", res.stdout


def _rows(suite, key: str):
    return json.loads((suite[1] / f"{key}.json").read_text())


@pytest.mark.slow
def test_quick_suite_writes_every_section_and_a_summary(quick_suite):
    text, _, plots, _ = quick_suite
    assert "kept text" in text
    keys = ("summary", "attention", "e2e", "memory", "memory_scaling", "data", "lasp", "s2",
            "costmodel")
    for key in keys:
        assert text.count(f"<!-- {key}:begin -->") == 1 and f"<!-- {key}:end -->" in text, key
    # the summary comes first and names the machine, every benchmark and the targets
    summary = text.split("<!-- summary:end -->")[0]
    assert text.index("<!-- summary:begin -->") < text.index("kept text")
    assert f"{os.cpu_count()} cores" in summary and "GiB RAM" in summary
    for key in keys[1:]:
        assert f"| {key} | ok |" in summary, key
    assert ("| flash_kernel | skipped: needs a GPU |" in summary
            or "| flash_kernel | ok |" in summary)
    for target in ("end-to-end MFU at T=8192, fp32", "end-to-end MFU at T=8192, bf16",
                   "causal ring CP=2 throughput vs dense", "ring vs plain_ring",
                   "ulysses vs ds_ulysses", "Triton flash"):
        assert target in summary, target
    for plot in ("attention.png", "e2e.png"):
        assert (plots / plot).stat().st_size > 1000, plot


@pytest.mark.slow
def test_quick_attention_runs_ours_and_the_peers(quick_suite):
    text = quick_suite[0]
    rows = _rows(quick_suite, "attention")
    ran = {(r["backend"], r["length"]) for r in rows if r["time_s"] is not None}
    for n in (1024, 2048):
        # the peers ran (a time, not n/a) beside ours
        for backend in ("dense", "ring", "ulysses", "plain_ring", "ds_ulysses"):
            assert (backend, n) in ran, (backend, n)
            if backend != "dense":
                assert re.search(rf"\| {n} \| {backend} CP=2 \| \d", text), (n, backend)
    assert "Ours vs peers at T=2048, CP=2: ring " in text and "x ds_ulysses's" in text


@pytest.mark.slow
def test_quick_e2e_measures_mfu_against_the_gemm_peak(quick_suite):
    got = _rows(quick_suite, "e2e")
    rows = got["rows"]
    assert [r for r in rows if r["error"]] == []
    assert {(r["layout"], r["precision"]) for r in rows} == {
        (layout, p) for layout in ("dense DP=2", "ring CP=2") for p in ("fp32", "bf16")}
    for r in rows:
        # MFU is the achieved rate over the peak measured in the run, both from the loop
        assert 0 < r["mfu"] < 1 and r["peak_tflops"] > 0, r
        assert abs(r["mfu"] - r["tflops_per_rank"] / r["peak_tflops"]) <= 0.02 * r["mfu"], r
        sequences = 1 if "CP" in r["layout"] else 2
        assert r["tokens_per_s"] == pytest.approx(sequences * r["seq_len"] / r["step_time_s"])
    assert {k["precision"] for k in got["kernels"]} == {"fp32", "bf16"}
    assert all(k["gemm_tflops"] > 0 and k["sdpa_tflops"] > 0 for k in got["kernels"])


@pytest.mark.slow
def test_quick_data_benchmark_compares_loader_and_step(quick_suite):
    got = _rows(quick_suite, "data")
    assert got["consumption"]["tokens_per_s"] > 0
    sources = {r["source"].split(" ")[0] for r in got["rows"]}
    assert sources >= {"synthetic", "files:", "hf"}
    assert all(r["tokens_per_s"] > 0 for r in got["rows"])


@pytest.mark.slow
def test_quick_lasp_benchmark_counts_the_bytes_sent(quick_suite):
    text, rows = quick_suite[0], _rows(quick_suite, "lasp")
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
def test_quick_s2_benchmark_counts_the_blocks_sent(quick_suite, tmp_path):
    text, rows = quick_suite[0], _rows(quick_suite, "s2")
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
def test_quick_memory_benchmark_measures_every_policy(quick_suite):
    text, got = quick_suite[0], _rows(quick_suite, "memory")
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


@pytest.mark.slow
def test_quick_memory_scaling_measures_every_backend_linear_in_the_length(quick_suite):
    text, got = quick_suite[0], _rows(quick_suite, "memory_scaling")
    rows = got["rows"]
    assert [r for r in rows if r["error"] or r["peak_mib"] is None] == []
    configs = {(r["label"], r["cp"]) for r in rows}
    assert len(configs) == 8 and {r["length"] for r in rows} == {1024, 2048}
    for label, cp in configs:
        peak = {r["length"]: r["peak_mib"] for r in rows if (r["label"], r["cp"]) == (label, cp)}
        # doubling T at most doubles the step's activation peak (plus noise): no T^2 term,
        # which would make it 4x at these lengths
        assert 0 < peak[2048] <= 2.5 * peak[1024], (label, cp, peak)
    assert "| ring | 2 |" in text and "longest T on 24 GiB" in text
