"""The Hydra app: composition, overrides, pre-flight refusal, and a short run through Ray."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException

from longtrain_launch.store import register_configs, to_run_config

register_configs()


def _compose(*overrides: str):
    with initialize_config_module(config_module="longtrain_conf", version_base="1.3"):
        dcfg = compose(config_name="config", overrides=["output_dir=/tmp/unused", *overrides])
    return to_run_config(dcfg)


def _cli(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    # the console script a user runs, from the same environment as the tests
    script = os.path.join(os.path.dirname(sys.executable), "longtrain-train")
    return subprocess.run([script, *args],
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def test_defaults_come_from_the_schema():
    cfg = _compose()
    assert (cfg.model.name, cfg.attention.backend, cfg.parallel.world_size) == ("tiny", "dense", 2)
    # unset: W&B's environment, then longtrain's default (offline), decide at run time
    assert cfg.launcher.kind == "local" and cfg.logging.wandb.mode is None
    assert cfg.init_from is None


def test_overrides_and_presets():
    cfg = _compose("parallel.tp=2", "model=tiny", "data.seq_len=4096", "train.steps=50")
    assert (cfg.parallel.tp, cfg.data.seq_len, cfg.train.steps) == (2, 4096, 50)
    big = _compose("model=8b", "rope=llama3")
    assert (big.model.hidden_size, big.model.num_kv_heads, big.model.num_layers) == (4096, 8, 32)
    assert big.rope.scaling == "llama3" and big.rope.theta == 500000.0
    ext = _compose("experiment=extend", "init.from=/some/dir", "rope.factor=8")
    assert ext.init_from == "/some/dir" and ext.init["required"] is True
    assert ext.rope.scaling == "yarn" and ext.rope.factor == 8.0


@pytest.mark.parametrize("override", ["foo=1", "model.hidden=3", "parallel.pp=2", "init.frm=/x",
                                      "train.steps=abc"])
def test_unknown_or_mistyped_keys_are_refused(override):
    with pytest.raises(ConfigCompositionException):
        _compose(override)


def test_impossible_layout_fails_before_any_worker(tmp_path):
    start = time.perf_counter()
    res = _cli("parallel.world_size=3", "parallel.tp=2", "data.seq_len=1001", "parallel.cp=1",
               f"output_dir={tmp_path}", timeout=120)
    assert res.returncode == 2, res.stderr
    assert "parallel.world_size=3" in res.stderr and "parallel.tp * parallel.cp" in res.stderr
    # nothing was started: no per-rank logs, no W&B run
    assert not (tmp_path / "logs").exists() and not (tmp_path / "wandb").exists()
    assert time.perf_counter() - start < 60

    res = _cli("parallel.tp=2", "model.num_kv_heads=1", "model.num_heads=3",
               f"output_dir={tmp_path}", timeout=120)
    assert res.returncode == 2
    assert "model.num_heads=3 is not divisible by parallel.tp=2" in res.stderr
    assert "model.num_kv_heads=1 is not divisible by parallel.tp=2" in res.stderr

    res = _cli("experiment=extend", f"output_dir={tmp_path}", timeout=120)
    assert res.returncode == 2 and "init.from" in res.stderr

    res = _cli(f"init.from={tmp_path / 'missing'}", f"output_dir={tmp_path}", timeout=120)
    assert res.returncode == 2 and "missing" in res.stderr


@pytest.mark.slow
def test_short_run_through_ray_with_two_workers(tmp_path):
    out = tmp_path / "run"
    secret = "lt-env-secret-9f8e7d6c5b4a"
    res = _cli("train.steps=40", "data.seq_len=256", "data.batch_size=4", "optim.warmup_steps=5",
               "logging.progress=false", f"output_dir={out}", "logging.wandb.name=smoke",
               "logging.wandb.tags=[ci]", f"hydra.run.dir={tmp_path}/hydra", timeout=600,
               env={"WANDB_API_KEY": secret})
    assert res.returncode == 0, res.stdout + res.stderr
    summary = res.stdout
    assert "longtrain run summary" in summary and "MFU" in summary
    # first contact: a start-up line before the wait for step 1, a labelled loss line, no
    # Ray token-authentication notice, no empty Hydra job log
    assert "longtrain: starting 2 worker(s) on an embedded Ray" in summary
    assert re.search(r"loss\s+[\d.]+ -> [\d.]+\s+\(means of the first / last \d+ logged steps",
                     summary), summary
    assert "Token authentication" not in res.stderr, res.stderr
    assert not (tmp_path / "hydra" / "train.log").exists()
    start, end = map(float, re.search(r"loss\s+([\d.]+) -> ([\d.]+)", summary).groups())
    assert end < start * 0.8, summary
    # one log file per rank, with the rank in every line
    for rank in (0, 1):
        text = (out / "logs" / f"rank{rank}.log").read_text()
        assert f"[rank {rank}]" in text and "step 40" in text
    # W&B offline run with the config and the loss history
    from longtrain.observability.wandb_files import read_offline_run

    run = read_offline_run(str(out))
    assert run.name == "smoke" and run.tags == ["ci"]
    assert run.config["train"]["steps"] == 40 and run.config["data"]["seq_len"] == 256
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tflops", "seq_len",
                "mem_peak_gib_max", "mem_peak_gib_min", "mem_peak_gib_mean", "comm_exposed_s",
                "comm_dp_s", "data_wait_s"):
        values = run.series(f"train/{key}")
        assert len(values) == 40, key
    assert all(0 < v < 1 for v in run.series("train/mfu"))
    assert run.summary["steps"] == 40 and not run.alerts
    for path in glob.glob(str(out / "**" / "*"), recursive=True):
        if os.path.isfile(path):
            assert secret.encode() not in open(path, "rb").read(), path
    # final weights load in transformers
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert hf.config.num_hidden_layers == 4
    assert json.loads((out / "hf" / "config.json").read_text())["vocab_size"] == 512


@pytest.mark.slow
def test_extend_a_hugging_face_checkpoint_at_tp2_cp2(tmp_path):
    """experiment=extend from a transformers-saved Llama at TP=2 x CP=2 (ring attention)
    through Ray: the first step's loss is transformers' loss with the scaled RoPE on the same
    (unsharded) batch, and the exported config carries the scaling."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from longtrain.config.schema import DataConfig
    from longtrain.data.loader import global_sequences

    torch.manual_seed(0)
    src = tmp_path / "base"
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256)).save_pretrained(src)
    out = tmp_path / "run"
    res = _cli("experiment=extend", f"init.from={src}", "rope.factor=2", "data.seq_len=512",
               "data.batch_size=2", "train.steps=4", "parallel.world_size=4", "parallel.tp=2",
               "parallel.cp=2", "attention=ring", "attention.check_every=2",
               "logging.wandb.mode=disabled",
               "logging.progress=false", f"output_dir={out}", timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    first = float(re.search(r"first step ([\d.]+)", res.stdout).group(1))
    assert not (out / "wandb").exists()

    exported = AutoConfig.from_pretrained(out / "hf")
    rope = exported.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 2.0
    assert rope["original_max_position_embeddings"] == 256
    assert exported.max_position_embeddings == 512

    # transformers, original weights + the exported (scaled) config, on step 0's batch
    ref = AutoModelForCausalLM.from_pretrained(src, config=exported, dtype=torch.float32)
    batch = global_sequences(DataConfig(seq_len=512), [0, 1])
    with torch.no_grad():
        logits = ref(batch[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 300), batch[:, 1:].reshape(-1))
    assert abs(first - expected.item()) < 2e-4 * expected.item() + 1e-4, (first, expected.item())


@pytest.mark.slow
def test_a_rerun_in_the_same_directory_resumes_and_ends_where_an_uninterrupted_run_ends(tmp_path):
    """Through the CLI and Ray: a run whose last checkpoint is lost (as after a crash at step
    5) restarts in its directory from step 4 and ends with the uninterrupted run's weights."""
    import shutil

    import torch

    from longtrain.checkpoint.native import list_checkpoints, open_native_weights

    args = ("train.steps=6", "checkpoint.every=2", "checkpoint.keep=5", "data.seq_len=256",
            "optim.warmup_steps=2", "logging.wandb.mode=disabled", "logging.progress=false",
            "train.save_hf=false")
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    for out in (full, crashed):
        res = _cli(*args, f"output_dir={out}", timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
    shutil.rmtree(crashed / "checkpoints" / "step_00000006")
    res = _cli(*args, f"output_dir={crashed}", timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming from" in res.stdout and "step_00000004" in res.stdout
    assert "continuing at step 4" in (crashed / "logs" / "rank0.log").read_text()
    assert [s for s, _ in list_checkpoints(str(crashed / "checkpoints"))] == [2, 4, 6]
    with open_native_weights(str(full / "checkpoints")) as a, \
            open_native_weights(str(crashed / "checkpoints")) as b:
        for name in ("model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight",
                     "lm_head.weight"):
            assert torch.equal(a(name), b(name)), name
    # checkpoint.resume=never starts over in the same directory
    res = _cli(*args, "checkpoint.resume=never", "train.steps=2", f"output_dir={crashed}",
               timeout=600)
    assert res.returncode == 0 and "resuming" not in res.stdout
