"""What an export does to the directory it writes to, and what it puts there: it never
touches files it did not write, refuses a foreign directory unless told to overwrite, leaves
no stale shards, writes shareable files, and carries the token ids, generation config and
tokenizer that make the result usable with transformers as-is (issue 20, items 1, 11, 12)."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

from data_helpers import make_hf_tokenizer
from longtrain.checkpoint.export_dir import MARKER_NAME
from longtrain.checkpoint.hf import export_hf
from longtrain.planning.resolve import apply_init_from
from longtrain.checkpoint.inference_files import inference_files
from longtrain.config.schema import DataConfig, ModelConfig, RopeConfig, RunConfig

transformers = pytest.importorskip("transformers")

# the tokenizer of data_helpers.make_hf_tokenizer: <unk> <s> </s> <pad> are ids 0-3
BOS, EOS, PAD, VOCAB = 1, 2, 3, 300


def _tiny_model(vocab_size: int = 301):
    from longtrain.attention.base import get_attention
    from longtrain.model.llama import LlamaModel
    from longtrain.model.sharding import init_weights

    model = LlamaModel(ModelConfig(vocab_size=vocab_size, num_layers=2), RopeConfig(),
                       attention=get_attention("dense"), tp=1, tp_rank=0)
    init_weights(model, seed=3)
    return model


def _listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_foreign_directory_is_refused_and_overwrite_keeps_its_files(tmp_path, umask_022) -> None:
    model = _tiny_model()
    out = tmp_path / "zoo"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    (out / "notes.md").write_text("also mine")

    with pytest.raises(ValueError) as err:
        export_hf(model, model.rotary.rope, str(out))
    message = str(err.value)
    assert str(out) in message and "precious.txt" in message and "overwrite=true" in message
    assert _listing(out) == ["notes.md", "precious.txt"] and _listing(tmp_path) == ["zoo"]

    export_hf(model, model.rotary.rope, str(out), overwrite=True, max_shard_bytes=250_000)
    files = _listing(out)
    assert {"precious.txt", "notes.md", "config.json", "model.safetensors.index.json",
            MARKER_NAME} <= set(files)
    assert (out / "precious.txt").read_text() == "mine" and (out / "notes.md").read_text() == "also mine"
    assert _listing(tmp_path) == ["zoo"], "no staging directory is left behind"
    # safetensors and mkdtemp create 0600 / 0700; an export is for sharing
    for name in files + ["."]:
        if name not in ("precious.txt", "notes.md"):
            assert stat.S_IMODE(os.stat(out / name).st_mode) & 0o044 == 0o044, name

    # now an earlier export: no overwrite needed; stale shards of the sharded export go,
    # the user's files (also one added since) stay
    (out / "added-later.txt").write_text("mine too")
    export_hf(model, model.rotary.rope, str(out))
    assert _listing(out) == sorted([MARKER_NAME, "added-later.txt", "config.json",
                                    "model.safetensors", "notes.md", "precious.txt"])
    assert json.loads((out / MARKER_NAME).read_text())["files"] == ["config.json",
                                                                    "model.safetensors"]


def test_overwrite_replaces_stale_weights_of_a_foreign_directory(tmp_path) -> None:
    model = _tiny_model()
    out = tmp_path / "foreign"
    out.mkdir()
    # someone else's single-file weights would shadow a sharded export (loaders try it first)
    (out / "model.safetensors").write_bytes(b"not ours")
    (out / "tokenizer.json").write_text("{}")
    export_hf(model, model.rotary.rope, str(out), overwrite=True, max_shard_bytes=250_000)
    files = _listing(out)
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert (out / "tokenizer.json").read_text() == "{}", "a file this export does not write stays"


def test_interrupted_export_damages_no_user_file_and_the_next_one_cleans_up(
        tmp_path, monkeypatch) -> None:
    model = _tiny_model()
    out = tmp_path / "out"
    export_hf(model, model.rotary.rope, str(out), max_shard_bytes=250_000)
    (out / "precious.txt").write_text("mine")
    real_replace = os.replace
    calls = []

    def flaky_replace(src: Any, dst: Any) -> None:
        calls.append(dst)
        # the marker, the weights moved, then the "power cut" before config.json
        if len(calls) == 3:
            raise OSError("interrupted")
        real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", flaky_replace)
        with pytest.raises(OSError, match="interrupted"):
            export_hf(model, model.rotary.rope, str(out), dtype=torch.bfloat16)
    assert (out / "precious.txt").read_text() == "mine"
    assert _listing(tmp_path) == ["out"]
    # half-way: new weights, old shards and index still there
    assert {"model.safetensors", "model.safetensors.index.json"} <= set(_listing(out))
    export_hf(model, model.rotary.rope, str(out), dtype=torch.bfloat16)
    assert _listing(out) == sorted([MARKER_NAME, "config.json", "model.safetensors",
                                    "precious.txt"])


def test_export_written_before_the_marker_is_recognised(tmp_path) -> None:
    model = _tiny_model()
    out = tmp_path / "old-export"
    export_hf(model, model.rotary.rope, str(out))
    os.remove(out / MARKER_NAME)
    # what the exporter wrote before it had token ids: null ids, both dtype keys
    assert _listing(out) == ["config.json", "model.safetensors"]
    export_hf(model, model.rotary.rope, str(out), max_shard_bytes=250_000)
    assert "model.safetensors" not in _listing(out)


def test_training_refuses_a_foreign_hf_directory_before_it_starts(tmp_path) -> None:
    from longtrain.planning.validate import problems

    cfg = RunConfig(output_dir=str(tmp_path))
    assert not [p for p in problems(cfg) if "save_hf" in p]
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "precious.txt").write_text("mine")
    found = [p for p in problems(cfg) if "train.save_hf" in p]
    assert len(found) == 1 and "precious.txt" in found[0] and str(tmp_path / "hf") in found[0]
    assert not [p for p in problems(dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, save_hf=False))) if "save_hf" in p]


def test_export_command_refuses_a_foreign_directory_unless_overwrite(tmp_path, capsys) -> None:
    from longtrain_launch.export import main

    src = tmp_path / "src"
    export_hf(_tiny_model(), RopeConfig(), str(src))
    out = tmp_path / "models"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    assert main([f"checkpoint={src}", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "precious.txt" in err and "overwrite=true" in err
    assert _listing(out) == ["precious.txt"]
    assert main([f"checkpoint={src}", f"out={out}", "overwrite=true"]) == 0
    assert {"precious.txt", "config.json", "model.safetensors"} <= set(_listing(out))
    assert (out / "precious.txt").read_text() == "mine"
    # format=native replaces a whole directory: never over someone else's files
    assert main([f"checkpoint={src}", f"out={out}", "format=native"]) == 2
    assert "precious.txt" in capsys.readouterr().err and (out / "precious.txt").exists()


# ---------------------------------------------------------------------------------------
# usable for inference as-is


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory) -> Path:
    """A tiny Llama directory as a user downloads one: weights, config.json with real token
    ids, generation_config.json and the tokenizer. Every position's EOS logit dominates: the
    residual stream stays the (constant) embedding and only EOS's output row sees it."""
    path = tmp_path_factory.mktemp("src") / "tiny-llama"
    make_hf_tokenizer(path)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[EOS] = 1.0
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, do_sample=False, max_length=50)
    model.save_pretrained(path)
    return path


def _generate_until_eos(path: Path) -> list[int]:
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    assert tok.eos_token_id == EOS and model.generation_config.eos_token_id == EOS
    prompt = tok("hello there", return_tensors="pt")
    n = prompt["input_ids"].shape[1]
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)[0].tolist()
    # one new token, EOS, then stop: without eos_token_id generate() runs all 8 steps
    assert out[n:] == [EOS], out
    return out


def _assert_inference_files(out: Path, src: Path) -> None:
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (BOS, EOS, PAD)
    assert json.loads((out / "generation_config.json").read_text()) == \
        json.loads((src / "generation_config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    _generate_until_eos(out)


def test_source_model_generates_until_eos(hf_source) -> None:
    _generate_until_eos(hf_source)


def test_export_command_carries_ids_generation_config_and_tokenizer(hf_source, tmp_path) -> None:
    from longtrain_launch.export import main

    out = tmp_path / "export"
    assert main([f"checkpoint={hf_source}", f"out={out}"]) == 0
    _assert_inference_files(out, hf_source)
    # through a weights-only native checkpoint (which records the tokenizer) and back
    native, again = tmp_path / "native", tmp_path / "again"
    assert main([f"checkpoint={hf_source}", f"out={native}", "format=native"]) == 0
    assert main([f"checkpoint={native}", f"out={again}"]) == 0
    _assert_inference_files(again, hf_source)
    # tokenizer= names another tokenizer (here: the byte tokenizer, which has no files)
    byte = tmp_path / "byte"
    assert main([f"checkpoint={hf_source}", f"out={byte}", "tokenizer=byte"]) == 0
    assert json.loads((byte / "config.json").read_text())["eos_token_id"] == 257
    assert not (byte / "tokenizer.json").exists()


def test_end_of_training_export_of_an_extended_model_is_usable(hf_source, tmp_path) -> None:
    """What the worker does after training `experiment=extend init.from=<hf_source>` with
    the default data.tokenizer, on the model loaded from init.from."""
    from longtrain.attention.base import get_attention
    from longtrain.checkpoint.hf import open_hf_weights
    from longtrain.model.llama import LlamaModel
    from longtrain.model.sharding import load_canonical

    cfg = apply_init_from(RunConfig(init={"from": str(hf_source), "required": True}))
    assert cfg.data.tokenizer == str(hf_source)
    model = LlamaModel(cfg.model, cfg.rope, attention=get_attention("dense"), tp=1, tp_rank=0)
    with open_hf_weights(str(hf_source)) as get:
        load_canonical(model, get)
    out = tmp_path / "run" / "hf"
    export_hf(model, cfg.rope, str(out), inference=inference_files(cfg.data.tokenizer))
    _assert_inference_files(out, hf_source)


def test_byte_tokenizer_export_gets_its_ids_and_a_generation_config(tmp_path) -> None:
    from longtrain.data.loader import data_state
    from longtrain.data.tokenizer import ByteTokenizer

    model = _tiny_model(vocab_size=259)
    out = tmp_path / "hf"
    # a run from scratch leaves data.tokenizer at its default
    spec = RunConfig().data.tokenizer
    export_hf(model, model.rotary.rope, str(out), inference=inference_files(spec))
    byte = ByteTokenizer()
    ids = {"bos_token_id": byte.bos_id, "eos_token_id": byte.eos_id, "pad_token_id": byte.pad_id}
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ids} == ids
    assert json.loads((out / "generation_config.json").read_text()) == ids
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert loaded.generation_config.eos_token_id == byte.eos_id
    # a checkpoint of that run records the tokenizer an export of it carries
    assert data_state(DataConfig(), step=3)["tokenizer"] == "byte"


# ---------------------------------------------------------------------------------------
# data.tokenizer follows init.from


def test_init_from_tokenizer_is_the_default(hf_source, tmp_path) -> None:
    from longtrain.checkpoint.convert import convert
    from longtrain.checkpoint.source import tokenizer_warnings

    base = RunConfig(init={"from": str(hf_source), "required": True})
    assert base.data.tokenizer == "auto"
    cfg = apply_init_from(base)
    assert cfg.data.tokenizer == str(hf_source) and tokenizer_warnings(cfg) == []
    # the same tokenizer at another path is no reason to warn
    copy = tmp_path / "tok-copy"
    copy.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).write_bytes((hf_source / name).read_bytes())
    assert tokenizer_warnings(dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, tokenizer=str(copy)))) == []
    # a native checkpoint made from it knows its tokenizer too
    native = tmp_path / "native"
    convert(str(hf_source), str(native), format="native")
    from_native = apply_init_from(RunConfig(init={"from": str(native), "required": True}))
    assert from_native.data.tokenizer == str(hf_source)
    assert tokenizer_warnings(from_native) == []


def test_another_vocabulary_warns_and_one_that_does_not_fit_is_refused(hf_source, tmp_path) -> None:
    from longtrain.checkpoint.source import tokenizer_warnings
    from longtrain.planning.validate import problems

    base = RunConfig(init={"from": str(hf_source), "required": True}, output_dir=str(tmp_path))
    byte = apply_init_from(dataclasses.replace(base, data=DataConfig(tokenizer="byte")))
    assert byte.data.tokenizer == "byte"
    [warning] = tokenizer_warnings(byte)
    assert "data.tokenizer='byte' (259 ids)" in warning and str(hf_source) in warning
    assert f"{VOCAB} ids" in warning

    # a bigger vocabulary than the source's embedding: refused, naming both sizes
    small = tmp_path / "small-model"
    export_hf(_tiny_model(vocab_size=200), RopeConfig(), str(small))
    cfg = apply_init_from(RunConfig(init={"from": str(small), "required": True},
                                    data=DataConfig(tokenizer=str(hf_source)),
                                    output_dir=str(tmp_path / "run")))
    found = [p for p in problems(cfg) if "data.tokenizer" in p]
    assert found == [f"model.vocab_size=200 is smaller than the {VOCAB} ids of "
                     f"data.tokenizer={str(hf_source)!r}"], problems(cfg)

    # a source without a tokenizer: byte, said out loud
    silent = apply_init_from(RunConfig(init={"from": str(small), "required": True}))
    assert silent.data.tokenizer == "byte"
    [warning] = tokenizer_warnings(silent)
    assert "holds no tokenizer" in warning and str(small) in warning


def test_eval_reads_the_checkpoints_tokenizer_by_default(hf_source, tmp_path) -> None:
    from longtrain.config.eval_schema import EvalRunConfig
    from longtrain.planning.eval import _resolve_tokenizer

    assert _resolve_tokenizer(EvalRunConfig(checkpoint=str(hf_source))).data.tokenizer == \
        str(hf_source)
    bare = tmp_path / "bare"
    export_hf(_tiny_model(), RopeConfig(), str(bare))
    assert _resolve_tokenizer(EvalRunConfig(checkpoint=str(bare))).data.tokenizer == "byte"
