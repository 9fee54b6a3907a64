"""Hugging Face interop against transformers as the oracle: config and weight import (TP=1 and
TP=2), export and re-load, refusals and error messages, and `init.from` config merging.

Every model is a random tiny one written by transformers' `save_pretrained`; nothing is
downloaded. Shape legend: b batch, t tokens, v vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import TYPE_CHECKING, Any

import pytest
import torch

from longtrain.checkpoint.export_dir import MARKER_NAME
from longtrain.checkpoint.hf import export_hf, open_hf_weights, read_hf_config
from longtrain.planning.resolve import apply_init_from
from longtrain.config.schema import ModelConfig, RopeConfig, RunConfig

if TYPE_CHECKING:
    from longtrain.model.llama import LlamaModel

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# Tolerances live here: max |ours - ref| / max |ref| over the logits, float32 throughout.
LOGITS_REL_TOL = 1e-4

_SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              rms_norm_eps=1e-5)


def _llama(**kw: Any):
    return transformers.LlamaConfig(**{**_SHAPE, "num_hidden_layers": 2, **kw})


# (name, config, sequence length, save_pretrained kwargs). Lengths beyond the original context
# exercise YaRN and dynamic NTK where they differ from plain RoPE; odd vocabularies exercise
# the TP vocabulary padding.
CASES: list[tuple[str, Any, int, dict[str, Any]]] = [
    ("llama", _llama(vocab_size=250, max_position_embeddings=64), 40, {}),
    ("llama-yarn", _llama(vocab_size=251, max_position_embeddings=128, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
        "rope_theta": 10000.0}), 48, {}),
    ("llama3", _llama(vocab_size=250, max_position_embeddings=256, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 500000.0}), 48, {}),
    ("llama-linear-headdim", _llama(vocab_size=250, max_position_embeddings=64, head_dim=32,
                                    rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                     "rope_theta": 10000.0}), 40, {}),
    ("llama-dynamic", _llama(vocab_size=250, max_position_embeddings=32, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}), 56, {}),
    ("qwen2-tied", transformers.Qwen2Config(**_SHAPE, num_hidden_layers=3, vocab_size=251,
                                            max_position_embeddings=64, tie_word_embeddings=True,
                                            use_sliding_window=False), 40, {}),
    ("mistral-sharded", transformers.MistralConfig(**_SHAPE, num_hidden_layers=2, vocab_size=250,
                                                   max_position_embeddings=64, sliding_window=None),
     40, {"max_shard_size": "40KB"}),
]
CASE_NAMES = [c[0] for c in CASES]
# Exported with this shard limit (the others in one file), to cover a sharded export.
SHARDED_EXPORT = {"llama-yarn": 60_000}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def _hf_logits(path: str, tokens_bt: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager")
    with torch.no_grad():
        return model(tokens_bt).logits


@pytest.fixture(scope="module")
def hf_cases(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Each case saved by transformers, with seeded tokens and transformers' logits."""
    root = tmp_path_factory.mktemp("hf")
    cases = {}
    for seed, (name, config, seq_len, save_kw) in enumerate(CASES):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # Non-trivial norms and biases, so a wrongly loaded one cannot hide behind 1s and 0s.
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("norm.weight"):
                    p.normal_(1.0, 0.2)
                elif pname.endswith(".bias"):
                    p.normal_(0.0, 0.2)
                else:
                    p.normal_(0.0, 0.08)
        path = str(root / name)
        model.save_pretrained(path, **save_kw)
        tokens_bt = torch.randint(0, config.vocab_size, (2, seq_len),
                                  generator=torch.Generator().manual_seed(100 + seed))
        cases[name] = {"name": name, "dir": path, "tokens": tokens_bt,
                       "ref": _hf_logits(path, tokens_bt)}
    return cases


def _parity_worker(runtime, cases: list[dict[str, Any]], export_root: str | None) -> None:
    from longtrain.attention.base import get_attention
    from longtrain.model.llama import LlamaModel
    from longtrain.model.sharding import gather_vocab_logits, load_canonical

    tp = runtime.dims.tp
    for case in cases:
        model_cfg, rope = read_hf_config(case["dir"])
        model = LlamaModel(model_cfg, rope, attention=get_attention("dense"), tp=tp,
                           tp_rank=runtime.tp_rank)
        with open_hf_weights(case["dir"]) as get:
            load_canonical(model, get)
        with torch.no_grad():
            logits_btv = gather_vocab_logits(model(case["tokens"]), vocab_size=model_cfg.vocab_size,
                                             tp=tp, group=runtime.tp_group)
        err = _rel_err(logits_btv, case["ref"])
        assert err <= LOGITS_REL_TOL, f"{case['name']} at tp={tp}: relative error {err:.2e}"
        if export_root is not None:
            export_hf(model, rope, os.path.join(export_root, case["name"]), tp_group=runtime.tp_group,
                      is_writer=runtime.tp_rank == 0,
                      max_shard_bytes=SHARDED_EXPORT.get(case["name"], 2 * 1024**3))
    if export_root is not None:
        # A writer that fails must not leave the other ranks waiting: every rank raises.
        blocker = os.path.join(os.path.dirname(export_root), "a-file")
        if runtime.tp_rank == 0:
            open(blocker, "w").close()
        with pytest.raises(OSError if runtime.tp_rank == 0 else RuntimeError):
            export_hf(model, rope, os.path.join(blocker, "out"), tp_group=runtime.tp_group,
                      is_writer=runtime.tp_rank == 0)


def test_logits_match_transformers_tp1(hf_cases) -> None:
    from longtrain.parallel.spawn import run_distributed

    run_distributed(_parity_worker, world_size=1, tp=1, args=(list(hf_cases.values()), None),
                    threads=2)


def test_logits_match_transformers_tp2_and_export_round_trip(hf_cases, tmp_path) -> None:
    from longtrain.parallel.spawn import run_distributed

    export_root = tmp_path / "exported"
    # An earlier export's files are replaced (a stale shard of it removed), the user's kept.
    stale = export_root / "llama"
    stale.mkdir(parents=True)
    (stale / "model-00001-of-00009.safetensors").write_text("old")
    (stale / "notes.txt").write_text("mine")
    (stale / MARKER_NAME).write_text(json.dumps({"kind": "longtrain-hf-export",
                                                 "files": ["model-00001-of-00009.safetensors"]}))
    run_distributed(_parity_worker, world_size=2, tp=2, args=(list(hf_cases.values()), str(export_root)))

    assert sorted(os.listdir(export_root)) == sorted(CASE_NAMES), "temporary directories left behind"
    assert not (stale / "model-00001-of-00009.safetensors").exists()
    assert (stale / "notes.txt").read_text() == "mine"
    for name, case in hf_cases.items():
        out = str(export_root / name)
        files = set(os.listdir(out)) - {MARKER_NAME, "notes.txt"}
        if name in SHARDED_EXPORT:
            assert "model.safetensors.index.json" in files and len(files) > 3, files
        else:
            assert files == {"config.json", "model.safetensors"}, files
        err = _rel_err(_hf_logits(out, case["tokens"]), case["ref"])
        assert err <= LOGITS_REL_TOL, f"{name}: exported model's relative error {err:.2e}"
        # Exactly the tensors transformers wrote (tied models carry no lm_head.weight).
        with open_hf_weights(case["dir"]) as get_ref, open_hf_weights(out) as get_out:
            names = _tensor_names(case["dir"])
            assert _tensor_names(out) == names, name
            for tensor_name in names:
                assert torch.equal(get_out(tensor_name), get_ref(tensor_name)), (name, tensor_name)

        hf_config = transformers.AutoConfig.from_pretrained(out)
        src_config = transformers.AutoConfig.from_pretrained(case["dir"])
        assert hf_config.model_type == ("qwen2" if name.startswith("qwen2") else "llama")
        assert hf_config.rope_parameters["rope_theta"] == src_config.rope_parameters["rope_theta"]
        assert hf_config.rope_parameters["rope_type"] == src_config.rope_parameters["rope_type"]
        assert hf_config.tie_word_embeddings == src_config.tie_word_embeddings
        for key in ("factor", "original_max_position_embeddings", "low_freq_factor"):
            assert hf_config.rope_parameters.get(key) == src_config.rope_parameters.get(key), (name, key)
        assert read_hf_config(out) == (dataclasses.replace(read_hf_config(case["dir"])[0], name=name),
                                       read_hf_config(case["dir"])[1])


def _tensor_names(path: str) -> set[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def test_read_hf_config_fields(hf_cases) -> None:
    model, rope = read_hf_config(hf_cases["qwen2-tied"]["dir"])
    assert model == ModelConfig(name="qwen2-tied", vocab_size=251, hidden_size=64, intermediate_size=128,
                                num_layers=3, num_heads=4, num_kv_heads=2, head_dim=None, norm_eps=1e-5,
                                tie_embeddings=True, qkv_bias=True, max_position_embeddings=64)
    assert rope == RopeConfig()
    model, rope = read_hf_config(hf_cases["llama-linear-headdim"]["dir"])
    assert (model.head_dim, model.qkv_bias, model.tie_embeddings) == (32, False, False)
    assert (rope.scaling, rope.factor) == ("linear", 2.0)
    _, rope = read_hf_config(hf_cases["llama3"]["dir"])
    assert rope == RopeConfig(scaling="llama3", theta=500000.0, factor=8.0,
                              original_max_position_embeddings=32)


def _config_with(tmp_path, src: str, **changes: Any) -> str:
    with open(os.path.join(src, "config.json")) as f:
        raw = json.load(f)
    for key, value in changes.items():
        if value is _DELETE:
            raw.pop(key)
        else:
            raw[key] = value
    out = tmp_path / "edited"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(raw))
    return str(out)


_DELETE = object()


@pytest.mark.parametrize("case, changes, needle", [
    ("llama", {"model_type": "gpt2"}, "model_type='gpt2'"),
    ("llama", {"mlp_bias": True}, "mlp_bias=True"),
    ("llama", {"attention_bias": True}, "attention_bias=True"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("llama", {"vocab_size": _DELETE}, "'vocab_size' is missing"),
    ("llama", {"num_attention_heads": 0}, "num_attention_heads=0"),
    ("mistral-sharded", {"sliding_window": 4096}, "sliding_window=4096"),
    ("qwen2-tied", {"sliding_window": 16, "use_sliding_window": True}, "use_sliding_window=True"),
    ("llama", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "longrope"),
])
def test_read_hf_config_refuses(hf_cases, tmp_path, case: str, changes: dict[str, Any], needle: str) -> None:
    path = _config_with(tmp_path, hf_cases[case]["dir"], **changes)
    with pytest.raises(ValueError) as info:
        read_hf_config(path)
    assert needle in str(info.value) and os.path.join(path, "config.json") in str(info.value)


def test_read_hf_config_missing_or_malformed(tmp_path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        read_hf_config(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty / "config.json"))):
        read_hf_config(str(empty))
    (empty / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(empty / "config.json"))):
        read_hf_config(str(empty))


def test_open_hf_weights_errors_name_the_file(hf_cases, tmp_path) -> None:
    llama = hf_cases["llama"]["dir"]
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        with open_hf_weights(str(tmp_path / "nope")):
            pass
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(llama, "config.json"), no_weights)
    with pytest.raises(FileNotFoundError) as info:
        with open_hf_weights(str(no_weights)):
            pass
    assert all(s in str(info.value) for s in (str(no_weights), "model.safetensors", "pytorch_model.bin"))

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    data = open(os.path.join(llama, "model.safetensors"), "rb").read()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(truncated / "model.safetensors"))):
        with open_hf_weights(str(truncated)):
            pass

    state = safetensors_torch.load_file(os.path.join(llama, "model.safetensors"))
    gone = "model.layers.1.mlp.up_proj.weight"
    missing = tmp_path / "missing-tensor"
    missing.mkdir()
    safetensors_torch.save_file({k: v for k, v in state.items() if k != gone},
                                str(missing / "model.safetensors"), metadata={"format": "pt"})
    with open_hf_weights(str(missing)) as get:
        torch.testing.assert_close(get("model.norm.weight"), state["model.norm.weight"], rtol=0, atol=0)
        with pytest.raises(ValueError) as info:
            get(gone)
    assert gone in str(info.value) and str(missing / "model.safetensors") in str(info.value)

    sharded = tmp_path / "sharded"
    shutil.copytree(hf_cases["mistral-sharded"]["dir"], sharded)
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].pop(gone)
    index_path.write_text(json.dumps(index))
    with open_hf_weights(str(sharded)) as get:
        with pytest.raises(ValueError) as info:
            get(gone)
    assert gone in str(info.value) and str(index_path) in str(info.value)
    dropped = index["weight_map"]["model.norm.weight"]
    os.remove(sharded / dropped)
    with pytest.raises(ValueError, match=re.escape(str(sharded / dropped))):
        with open_hf_weights(str(sharded)):
            pass


def test_open_hf_weights_reads_pytorch_bin_and_its_index(hf_cases, tmp_path) -> None:
    state = safetensors_torch.load_file(os.path.join(hf_cases["llama"]["dir"], "model.safetensors"))
    single = tmp_path / "single"
    single.mkdir()
    torch.save(state, single / "pytorch_model.bin")
    names = sorted(state)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    halves = {"a.bin": names[: len(names) // 2], "b.bin": names[len(names) // 2:]}
    for file, part in halves.items():
        torch.save({k: state[k] for k in part}, sharded / file)
    weight_map = {k: file for file, part in halves.items() for k in part}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for path in (single, sharded):
        with open_hf_weights(str(path)) as get:
            for name in names:
                assert torch.equal(get(name), state[name]), (path, name)


def _tiny_model() -> LlamaModel:
    from longtrain.attention.base import get_attention
    from longtrain.model.llama import LlamaModel
    from longtrain.model.sharding import init_weights

    # Built outside any process group: construction, init and the TP=1 canonical stream need
    # none (only the forward does).
    model = LlamaModel(ModelConfig(vocab_size=301, num_layers=2), RopeConfig(scaling="yarn", factor=2.0),
                       attention=get_attention("dense"), tp=1, tp_rank=0)
    init_weights(model, seed=3)
    return model


def test_export_is_atomic_and_sharded(tmp_path, monkeypatch) -> None:
    from longtrain.model.sharding import canonical_state_dict

    model = _tiny_model()
    out = tmp_path / "out"
    out.mkdir()
    # not written by an export: kept through every export below (overwrite=True lets the
    # export into a directory that is not an earlier export at all)
    (out / "old.txt").write_text("not ours")

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(safetensors_torch, "save_file", disk_full)
        with pytest.raises(OSError, match="disk full"):
            export_hf(model, model.rotary.rope, str(out), max_shard_bytes=250_000,
                      overwrite=True)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["old.txt"]

    def broken_stream(*args: Any, **kwargs: Any):
        yield "model.embed_tokens.weight", torch.zeros(301, 128)
        raise RuntimeError("gather failed")

    with monkeypatch.context() as patch:
        patch.setattr("longtrain.checkpoint.hf.iter_canonical", broken_stream)
        with pytest.raises(RuntimeError, match="gather failed"):
            export_hf(model, model.rotary.rope, str(out), overwrite=True)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["old.txt"]

    export_hf(model, model.rotary.rope, str(out), max_shard_bytes=250_000, overwrite=True)
    assert os.listdir(tmp_path) == ["out"]
    files = sorted(os.listdir(out))
    assert "old.txt" in files and "config.json" in files and "model.safetensors.index.json" in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and all(os.path.getsize(out / f) <= 250_000 + 4096 for f in shards)
    expected = canonical_state_dict(model)
    assert _tensor_names(str(out)) == set(expected)
    with open_hf_weights(str(out)) as get:
        for name, tensor in expected.items():
            assert torch.equal(get(name), tensor), name
    # YaRN's unset original length reads back resolved (the same function).
    assert read_hf_config(str(out)) == (dataclasses.replace(model.cfg, name="out"),
                                        dataclasses.replace(model.rotary.rope,
                                                            original_max_position_embeddings=4096))

    export_hf(model, model.rotary.rope, str(out), dtype=torch.bfloat16)
    assert sorted(os.listdir(out)) == [MARKER_NAME, "config.json", "model.safetensors", "old.txt"]
    raw = json.loads((out / "config.json").read_text())
    assert raw["dtype"] == "bfloat16" and raw["rope_parameters"]["rope_type"] == "yarn"
    with open_hf_weights(str(out)) as get:
        assert get("model.embed_tokens.weight").dtype == torch.bfloat16

    with pytest.raises(ValueError, match="max_shard_bytes=0"):
        export_hf(model, model.rotary.rope, str(out), max_shard_bytes=0)


def test_apply_init_from_rope_rules(hf_cases) -> None:
    path = hf_cases["llama3"]["dir"]
    ckpt_model, ckpt_rope = read_hf_config(path)
    base = RunConfig(model=ModelConfig(hidden_size=999, num_layers=7), init={"from": path})

    unset = dataclasses.replace(base, init={"from": None})
    assert apply_init_from(unset) is unset

    merged = apply_init_from(base)
    assert merged.model == ckpt_model and merged.rope == ckpt_rope
    assert base.model.hidden_size == 999, "the input config must not be modified"

    # Extending: the checkpoint's length becomes the scaling's original length, and the
    # model's max length grows to the training length.
    long_data = dataclasses.replace(base.data, seq_len=4 * ckpt_model.max_position_embeddings)
    user_yarn = RopeConfig(scaling="yarn", theta=1234.0, factor=4.0, beta_fast=16.0)
    merged = apply_init_from(dataclasses.replace(base, rope=user_yarn, data=long_data))
    assert merged.rope == dataclasses.replace(
        user_yarn, theta=ckpt_rope.theta,
        original_max_position_embeddings=ckpt_model.max_position_embeddings)
    assert merged.model.max_position_embeddings == long_data.seq_len
    explicit = dataclasses.replace(user_yarn, original_max_position_embeddings=77)
    assert apply_init_from(dataclasses.replace(base, rope=explicit)).rope.original_max_position_embeddings == 77

    user_abf = RopeConfig(scaling="abf", theta=2e6)
    assert apply_init_from(dataclasses.replace(base, rope=user_abf)).rope == dataclasses.replace(
        user_abf, original_max_position_embeddings=ckpt_model.max_position_embeddings)
