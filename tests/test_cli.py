"""The console's first contact: --version, --help, unknown keys with a did-you-mean, one exit
code for bad input (Hydra's own errors included), --check writing nothing and saying what RoPE
does, an unreachable Ray head failing fast."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from longtrain.config.schema import RunConfig
from longtrain_launch.cli import config_groups, unknown_key_problems


def _cli(*args: str, cwd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    script = os.path.join(os.path.dirname(sys.executable), "longtrain-train")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env)


def test_unknown_keys_get_a_did_you_mean():
    groups = config_groups()
    found = unknown_key_problems(["parallel.tpp=2", "data.seqlen=5", "modle=tiny", "model=8b",
                                  "parallel.tp=2", "init.from=/x", "+extra=1", "hydra.run.dir=x",
                                  "-m", "--config-name", "config", "train.schedule=[]"],
                                 schema=RunConfig, groups=groups)
    assert len(found) == 3, found
    assert "parallel.tpp: unknown key 'tpp' in parallel; did you mean parallel.tp?" in found
    assert any(p.startswith("data.seqlen:") and "data.seq_len" in p for p in found)
    assert any(p.startswith("modle:") and "did you mean model?" in p for p in found)
    # nothing close: the valid names are listed instead
    far = unknown_key_problems(["parallel.zzzzzz=1"], schema=RunConfig, groups=groups)
    assert len(far) == 1 and "parallel has:" in far[0] and "world_size" in far[0]


def test_version_help_and_bad_input_exit_codes(tmp_path):
    cwd = str(tmp_path)
    res = _cli("--version", cwd=cwd)
    assert res.returncode == 0 and res.stdout.startswith("longtrain-train (longtrain "), res
    res = _cli("--help", cwd=cwd)
    assert res.returncode == 0, res.stderr
    for needle in ("longtrain-train --check", "longtrain-eval", "longtrain-export",
                   "attention: allgather, dense", "Exit codes:"):
        assert needle in res.stdout, needle
    assert "powered by Hydra" not in res.stdout
    # longtrain's own check of the keys, before Hydra: exit 2, not Hydra's "+key" hint
    res = _cli("parallel.tpp=2", cwd=cwd)
    assert res.returncode == 2, res
    assert "did you mean parallel.tp?" in res.stderr and "+parallel.tpp" not in res.stderr
    # an error Hydra finds itself (an option that does not exist): the same exit code
    res = _cli("model=no_such_model", cwd=cwd)
    assert res.returncode == 2, res
    assert "no_such_model" in res.stderr
    # nothing was written by any of these
    assert os.listdir(cwd) == []


def test_check_writes_nothing_and_says_what_rope_does(tmp_path):
    cwd = str(tmp_path)
    res = _cli("--check", "rope.factor=4", cwd=cwd)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "init from scratch; rope unscaled, theta 10000" in res.stdout
    assert "warning: rope.factor=4 is ignored by rope.scaling=none" in res.stdout
    res = _cli("--check", "rope=yarn", "rope.factor=2", "model.max_position_embeddings=1024",
               "data.seq_len=4096", cwd=cwd)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "rope yarn x2, theta 10000, original 1024 -> 2048 positions" in res.stdout
    assert "data.seq_len=4096 exceeds rope.factor x original length = 2 x 1024 = 2048" \
        in res.stdout
    res = _cli("--check", "-m", "data.seq_len=1024,2048", cwd=cwd)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("constraints: all satisfied") == 2
    assert os.listdir(cwd) == [], os.listdir(cwd)


def test_an_unreachable_ray_head_fails_fast_naming_it(tmp_path):
    start = time.monotonic()
    res = _cli("launcher=ray", "launcher.address=127.0.0.1:1", "launcher.connect_timeout_s=3",
               "train.steps=1", f"output_dir={tmp_path}/run", cwd=str(tmp_path))
    took = time.monotonic() - start
    assert res.returncode == 2, res.stdout + res.stderr
    assert "launcher.address=127.0.0.1:1: no Ray head answers there" in res.stderr
    assert "launcher.connect_timeout_s" in res.stderr
    # the configured wait plus start-up, not Ray's minutes of retries
    assert took < 60, took
