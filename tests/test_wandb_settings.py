"""Where a W&B run goes (config, then W&B's environment, then longtrain's defaults) and which
config keys are redacted as credentials."""

from __future__ import annotations

import glob
import os

import pytest

from longtrain.config.schema import RunConfig, WandbConfig
from longtrain.observability.wandb_run import (REDACTED, WandbRun, is_secret_key, redact,
                                               resolve_settings)

ENV = {"WANDB_MODE": "disabled", "WANDB_PROJECT": "env-project", "WANDB_ENTITY": "env-team",
       "WANDB_NAME": "env-name", "WANDB_RUN_GROUP": "env-group", "WANDB_TAGS": "a, b,,c",
       "WANDB_DIR": "/env/dir"}


def test_settings_come_from_the_config_then_the_environment_then_the_defaults():
    # neither: longtrain's defaults
    got = resolve_settings(WandbConfig(), {}, output_dir="/out")
    assert (got.mode, got.project, got.entity, got.name, got.group, got.tags, got.dir) == \
        ("offline", "longtrain", None, None, None, (), "/out")
    assert set(got.sources.values()) == {"default"}
    # an empty variable counts as unset
    assert resolve_settings(WandbConfig(), {"WANDB_PROJECT": " "}, output_dir="/o").project \
        == "longtrain"
    # the environment fills every unset field
    got = resolve_settings(WandbConfig(), ENV, output_dir="/out")
    assert (got.mode, got.project, got.entity, got.name, got.group, got.tags, got.dir) == \
        ("disabled", "env-project", "env-team", "env-name", "env-group", ("a", "b", "c"),
         "/env/dir")
    assert got.sources["group"] == "WANDB_RUN_GROUP" and got.sources["dir"] == "WANDB_DIR"
    # the config wins where it is set, an explicitly empty tag list included
    cfg = WandbConfig(mode="online", project="cfg-project", entity="cfg-team", name="cfg-name",
                      group="cfg-group", tags=[], dir="/cfg/dir")
    got = resolve_settings(cfg, ENV, output_dir="/out")
    assert (got.mode, got.project, got.entity, got.name, got.group, got.tags, got.dir) == \
        ("online", "cfg-project", "cfg-team", "cfg-name", "cfg-group", (), "/cfg/dir")
    assert set(got.sources.values()) == {"config"}
    # a mix: W&B's legacy mode name, the rest per field
    got = resolve_settings(WandbConfig(project="mine"), {"WANDB_MODE": "dryrun",
                                                         "WANDB_PROJECT": "theirs"},
                           output_dir="/out")
    assert (got.mode, got.project, got.sources["mode"]) == ("offline", "mine", "WANDB_MODE")
    with pytest.raises(ValueError, match="'loud'.*WANDB_MODE"):
        resolve_settings(WandbConfig(), {"WANDB_MODE": "loud"}, output_dir="/out")


def test_an_offline_run_lands_under_wandb_dir_unless_the_config_says_where(tmp_path, monkeypatch):
    from longtrain.observability.wandb_files import read_offline_run

    out, env_dir, cfg_dir = tmp_path / "out", tmp_path / "env-dir", tmp_path / "cfg-dir"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(env_dir), "WANDB_PROJECT": "p",
           "WANDB_RUN_GROUP": "g-env", "WANDB_TAGS": "x,y"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    run = WandbRun(WandbConfig(), config={"a": 1}, output_dir=str(out), environ=os.environ)
    run.log({"loss": 1.0}, step=1)
    run.finish({"steps": 1})
    assert run.mode == "offline" and run.directory.startswith(str(env_dir))
    got = read_offline_run(str(env_dir))
    assert (got.group, got.tags) == ("g-env", ["x", "y"])
    # nothing under the output dir but the run id every restart shares
    assert not glob.glob(str(out / "wandb" / "*")) and (out / "wandb_run_id").is_file()
    # the config wins over WANDB_DIR (which W&B itself would read) and over WANDB_RUN_GROUP
    run = WandbRun(WandbConfig(dir=str(cfg_dir), group="g-cfg"), config={},
                   output_dir=str(tmp_path / "out2"), environ=os.environ)
    run.finish({})
    assert read_offline_run(str(cfg_dir)).group == "g-cfg"
    # WANDB_MODE=disabled: no run at all
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = WandbRun(WandbConfig(), config={}, output_dir=str(tmp_path / "out3"),
                   environ=os.environ)
    assert run.run is None and run.mode == "disabled"


@pytest.mark.parametrize("key", ["hf_token", "access_token", "token", "HF_TOKEN", "hfToken",
                                 "api_key", "apiKey", "WANDB_API_KEY", "password",
                                 "db_password", "secret", "client_secret", "credentials",
                                 "aws_secret_access_key", "private_key"])
def test_credential_keys_are_redacted(key):
    assert is_secret_key(key)
    assert redact({"outer": [{key: "s3cr3t"}]}) == {"outer": [{key: REDACTED}]}


@pytest.mark.parametrize("key", ["tokenizer", "tokenizer_path", "max_tokens", "tokens_per_step",
                                 "tokens_seen", "token_budget", "seq_len", "secret_name", "key",
                                 "keep", "author", "password_file_hint"])
def test_ordinary_keys_are_not_redacted(key):
    assert not is_secret_key(key)
    assert redact({key: "value"}) == {key: "value"}


def test_the_run_config_keeps_the_tokenizer_visible():
    import dataclasses

    config = dataclasses.asdict(RunConfig())
    config["data"]["hf_token"] = "s3cr3t"
    shown = redact(config)
    assert shown["data"]["tokenizer"] == config["data"]["tokenizer"] != REDACTED
    assert shown["data"]["hf_token"] == REDACTED
