"""The benchmark entry points run in their quick form and write their BENCHMARKS.md section
(no timing assertions: speed targets live in BENCHMARKS.md, not in tests)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


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
