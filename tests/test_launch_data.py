"""Data through the Hydra app: the presets, refusal of bad data before any worker starts
(exit 2, the file and field named), and a short run on a local corpus through Ray."""

from __future__ import annotations

import re

import pytest

from data_helpers import random_docs, write_jsonl
from longtrain.config.errors import ConfigError
from test_launch import _cli, _compose


def test_data_presets_and_fields():
    files = _compose("data=files", "data.path=/corpus", "data.text_field=body")
    assert (files.data.source, files.data.path, files.data.text_field) == \
        ("files", "/corpus", "body")
    # auto: init.from's tokenizer (resolved by apply_init_from), byte without one
    assert files.data.tokenizer == "auto" and files.data.add_bos and files.data.shuffle
    hub = _compose("data=hf", "data.name=allenai/c4", "data.subset=en", "data.streaming=true")
    assert (hub.data.source, hub.data.name, hub.data.subset, hub.data.streaming) == \
        ("hf", "allenai/c4", "en", True)
    # the checkpoint's tokenizer by interpolation
    ext = _compose("experiment=extend", "init.from=/ckpt", "data=files", "data.path=/c",
                   "data.tokenizer=${init.from}")
    assert ext.data.tokenizer == "/ckpt"
    synthetic = _compose("data.task=assoc_recall")
    assert (synthetic.data.source, synthetic.data.task) == ("synthetic", "assoc_recall")


def test_prepare_refuses_a_missing_field_naming_file_and_field(tmp_path):
    from hydra import compose, initialize_config_module

    from longtrain_launch.train import prepare

    path = write_jsonl(tmp_path / "c.jsonl", [{"body": t} for t in random_docs(20, seed=1)])
    overrides = ["output_dir=/tmp/unused", "data=files", f"data.path={path}",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=32"]
    with initialize_config_module(config_module="longtrain_conf", version_base="1.3"):
        bad = compose(config_name="config", overrides=overrides)
        good = compose(config_name="config", overrides=[*overrides, "data.text_field=body"])
    with pytest.raises(ConfigError, match=rf"{path}: records have no field 'text' "
                                          rf"\(data\.text_field\); fields present: \['body'\]"):
        prepare(bad)
    cfg = prepare(good)
    assert cfg.data.packed and cfg.data.packed.startswith(str(tmp_path / "cache"))


@pytest.mark.slow
def test_train_a_few_steps_on_a_jsonl_corpus_through_ray(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl",
                       [{"text": t} for t in random_docs(300, seed=2, max_words=60)])
    common = [f"data.cache_dir={tmp_path / 'cache'}", "logging.wandb.mode=disabled",
              "logging.progress=false", "train.save_hf=false"]
    res = _cli("data=files", "data.path=/does/not/exist.jsonl", *common,
               f"output_dir={tmp_path / 'bad'}", timeout=300)
    assert res.returncode == 2 and "data.path='/does/not/exist.jsonl' does not exist" in res.stderr
    assert not (tmp_path / "bad" / "logs").exists()

    out = tmp_path / "run"
    res = _cli("data=files", f"data.path={path}", "data.seq_len=64", "data.batch_size=4",
               "train.steps=4", "parallel.world_size=2", *common, f"output_dir={out}",
               timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"longtrain: data\.path=.*corpus\.jsonl.*: 300 documents, \d+ tokens",
                     res.stdout), res.stdout
    assert "longtrain run summary" in res.stdout
    start, end = map(float, re.search(r"loss\s+([\d.]+) -> ([\d.]+)", res.stdout).groups())
    assert end < start
    for rank in (0, 1):
        assert "step 4" in (out / "logs" / f"rank{rank}.log").read_text()
