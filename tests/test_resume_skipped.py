"""A damaged newest checkpoint: resume falls back to the previous one, and the console and
W&B say which checkpoint was skipped and why."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import torch

from longtrain.checkpoint.native import choose_resume, resolve_resume, write_weights_checkpoint
from longtrain.config.schema import ModelConfig, RopeConfig


def _truncate_largest_shard(path: str) -> tuple[str, int, int]:
    """Cut the checkpoint's largest .distcp file in half: (name, new size, old size)."""
    name = max((n for n in os.listdir(path) if n.endswith(".distcp")),
               key=lambda n: os.path.getsize(os.path.join(path, n)))
    file = os.path.join(path, name)
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    return name, size // 2, size


def test_choose_resume_names_the_skipped_checkpoint_and_why(tmp_path):
    root = str(tmp_path / "checkpoints")
    tensors = {"w": torch.ones(64, 64), "b": torch.zeros(8)}
    older, newer = (write_weights_checkpoint(os.path.join(root, f"step_{s:08d}"), tensors,
                                             model=ModelConfig(), rope=RopeConfig())
                    for s in (30, 40))
    assert choose_resume("auto", checkpoint_dir=root).skipped == ()
    name, now, was = _truncate_largest_shard(newer)
    choice = choose_resume("auto", checkpoint_dir=root)
    assert choice.path == older == resolve_resume("auto", checkpoint_dir=root)
    [(path, why)] = choice.skipped
    assert path == newer and f"{name} is {now} bytes, the manifest says {was}" in why
    [line] = choice.skipped_lines()
    assert line.startswith("step_00000040 skipped: ") and name in line and "truncated" in line
    # nothing skipped when the run is told where to resume, or not to
    assert choose_resume(older, checkpoint_dir=root).skipped == ()
    assert choose_resume("never", checkpoint_dir=root).path is None


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    script = os.path.join(os.path.dirname(sys.executable), "longtrain-train")
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_named_on_the_console_and_in_wandb(tmp_path):
    from longtrain.observability.wandb_files import read_offline_run

    out = tmp_path / "run"
    args = ("checkpoint.every=1", "checkpoint.keep=5", "data.seq_len=256", "data.batch_size=2",
            "optim.warmup_steps=1", "logging.progress=false", "train.save_hf=false",
            "logging.peak_tflops=1", f"output_dir={out}")
    res = _cli(*args, "train.steps=2")
    assert res.returncode == 0, res.stdout + res.stderr
    damaged = out / "checkpoints" / "step_00000002"
    name, now, was = _truncate_largest_shard(str(damaged))
    res = _cli(*args, "train.steps=3")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming from" in res.stdout and "step_00000001" in res.stdout
    line = next(ln for ln in res.stderr.splitlines() if "skipped" in ln)
    assert "step_00000002 skipped" in line and f"{name} is {now} bytes" in line, res.stderr
    # the second start's offline run holds one alert naming it
    newest = max(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb")),
                 key=os.path.getmtime)
    alerts = read_offline_run(newest).alerts
    assert [title for title, _ in alerts] == ["damaged checkpoint skipped"]
    assert "step_00000002 skipped" in alerts[0][1] and name in alerts[0][1]
    assert "step_00000001" in alerts[0][1]
