"""RoPE and its scaling methods against Hugging Face transformers as the oracle.

Shape legend: b batch, t tokens, h heads, d head_dim.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import pytest
import torch

from longtrain.config.schema import RopeConfig
from longtrain.model.rope import RotaryEmbedding, apply_rotary, rope_from_hf, rope_inv_freq, rope_to_hf

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

HEAD_DIM = 64
NUM_HEADS = 2
# Tolerances live here. inv_freq / scaling: the spec's 1e-6 relative. cos/sin: float32 angles
# at positions ~1e4 carry ~1e-3 ulp, so any last-bit difference in inv_freq (dynamic NTK:
# transformers computes its base in float32 tensors, we in float64) shows up at that scale.
INV_FREQ_RTOL = 1e-6
SCALING_ATOL = 1e-6
COS_SIN_ATOL = 1e-5
COS_SIN_ATOL_DYNAMIC = 1e-4

# (id, rope, max_position_embeddings)
CASES: list[tuple[str, RopeConfig, int]] = [
    ("none", RopeConfig(), 2048),
    ("abf", RopeConfig(scaling="abf", theta=500000.0), 4096),
    ("linear-4", RopeConfig(scaling="linear", factor=4.0), 8192),
    ("linear-2.5-theta1e6", RopeConfig(scaling="linear", factor=2.5, theta=1e6), 4096),
    ("dynamic-2", RopeConfig(scaling="dynamic_ntk", factor=2.0), 1024),
    (
        "dynamic-4-orig",
        RopeConfig(scaling="dynamic_ntk", factor=4.0, original_max_position_embeddings=512),
        2048,
    ),
    ("yarn-4", RopeConfig(scaling="yarn", factor=4.0, original_max_position_embeddings=1024), 4096),
    ("yarn-orig-none", RopeConfig(scaling="yarn", factor=2.0), 2048),
    (
        "yarn-attn-factor",
        RopeConfig(
            scaling="yarn",
            factor=8.0,
            theta=1e6,
            original_max_position_embeddings=512,
            attention_factor=0.8,
            beta_fast=16.0,
            beta_slow=2.0,
            truncate=False,
        ),
        4096,
    ),
    (
        "yarn-mscale",
        RopeConfig(
            scaling="yarn",
            factor=16.0,
            original_max_position_embeddings=256,
            mscale=1.0,
            mscale_all_dim=0.8,
        ),
        4096,
    ),
    (
        "yarn-mscale-only",
        RopeConfig(scaling="yarn", factor=4.0, original_max_position_embeddings=512, mscale=0.7),
        2048,
    ),
    (
        "llama3-8",
        RopeConfig(scaling="llama3", factor=8.0, theta=500000.0, original_max_position_embeddings=1024),
        8192,
    ),
    (
        "llama3-32",
        RopeConfig(
            scaling="llama3",
            factor=32.0,
            theta=1e4,
            original_max_position_embeddings=512,
            low_freq_factor=2.0,
            high_freq_factor=8.0,
        ),
        16384,
    ),
]
CASE_IDS = [case[0] for case in CASES]

# Which RopeConfig fields each scaling reads; everything else must come back as the default.
RELEVANT_FIELDS: dict[str, tuple[str, ...]] = {
    "none": ("theta",),
    "linear": ("theta", "factor"),
    "dynamic_ntk": ("theta", "factor", "original_max_position_embeddings"),
    "yarn": (
        "theta",
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "attention_factor",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
    "llama3": (
        "theta",
        "factor",
        "original_max_position_embeddings",
        "low_freq_factor",
        "high_freq_factor",
    ),
}


def _hf_dict(rope: RopeConfig, max_pos: int) -> dict[str, Any]:
    # JSON round trip: what we export must survive config.json unchanged.
    keys = json.loads(json.dumps(rope_to_hf(rope, max_position_embeddings=max_pos)))
    return {"max_position_embeddings": max_pos, **keys}


def _llama_config(hf_keys: dict[str, Any]) -> LlamaConfig:
    base = {
        "model_type": "llama",
        "hidden_size": HEAD_DIM * NUM_HEADS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_HEADS,
        "head_dim": HEAD_DIM,
        "num_hidden_layers": 1,
        "intermediate_size": 32,
        "vocab_size": 32,
    }
    return LlamaConfig.from_dict({**base, **copy.deepcopy(hf_keys)})


def _hf_inv_freq(hf_config: LlamaConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    rope_type = hf_config.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config)
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu", seq_len=seq_len)


def _assert_inv_freq_close(
    ours: tuple[torch.Tensor, float], theirs: tuple[torch.Tensor, float], *, what: str
) -> None:
    inv_freq_f, scaling = ours
    hf_inv_freq_f, hf_scaling = theirs
    assert inv_freq_f.dtype == torch.float32 and inv_freq_f.shape == (HEAD_DIM // 2,), what
    torch.testing.assert_close(inv_freq_f, hf_inv_freq_f.float(), rtol=INV_FREQ_RTOL, atol=0, msg=what)
    assert abs(scaling - float(hf_scaling)) <= SCALING_ATOL, (what, scaling, hf_scaling)


def _dynamic_seq_lens(rope: RopeConfig, max_pos: int) -> list[int | None]:
    original = rope.original_max_position_embeddings or max_pos
    return [None, original // 2, original, original + 1, 3 * original + 17]


@pytest.mark.parametrize(("name", "rope", "max_pos"), CASES, ids=CASE_IDS)
def test_inv_freq_matches_transformers(name: str, rope: RopeConfig, max_pos: int) -> None:
    hf_keys = _hf_dict(rope, max_pos)
    renamed = {"none": "default", "abf": "default", "dynamic_ntk": "dynamic"}
    expected_type = renamed.get(rope.scaling, rope.scaling)
    # transformers 5 must read all three spellings the same way: everything we write, only
    # the legacy transformers-4 keys, and only the transformers-5 key.
    legacy = {k: v for k, v in hf_keys.items() if k != "rope_parameters"}
    modern = {k: v for k, v in hf_keys.items() if k not in ("rope_theta", "rope_scaling")}
    seq_lens = _dynamic_seq_lens(rope, max_pos) if rope.scaling == "dynamic_ntk" else [None]
    for variant, keys in (("full", hf_keys), ("legacy", legacy), ("modern", modern)):
        hf_config = _llama_config(keys)
        assert hf_config.rope_parameters["rope_type"] == expected_type, variant
        for seq_len in seq_lens:
            ours = rope_inv_freq(
                rope, head_dim=HEAD_DIM, max_position_embeddings=max_pos, seq_len=seq_len
            )
            theirs = _hf_inv_freq(hf_config, seq_len)
            _assert_inv_freq_close(ours, theirs, what=f"{name}/{variant}/{seq_len}")


@pytest.mark.parametrize(("name", "rope", "max_pos"), CASES, ids=CASE_IDS)
def test_cos_sin_match_llama_rotary_embedding(name: str, rope: RopeConfig, max_pos: int) -> None:
    gen = torch.Generator().manual_seed(0)
    original = rope.original_max_position_embeddings or max_pos
    # Dynamic NTK only differs from plain RoPE beyond the original length, so go past it.
    high = 3 * original if rope.scaling == "dynamic_ntk" else max_pos
    positions_bt = torch.randint(0, high, (2, 48), generator=gen)
    ours = RotaryEmbedding(rope, head_dim=HEAD_DIM, max_position_embeddings=max_pos)
    cos_btd, sin_btd = ours(positions_bt)
    assert cos_btd.shape == (2, 48, HEAD_DIM) and cos_btd.dtype == torch.float32

    # A fresh module per call: transformers' dynamic NTK caches the longest length seen.
    theirs = LlamaRotaryEmbedding(_llama_config(_hf_dict(rope, max_pos)))
    hf_cos_btd, hf_sin_btd = theirs(torch.zeros(1, dtype=torch.float32), positions_bt)
    atol = COS_SIN_ATOL_DYNAMIC if rope.scaling == "dynamic_ntk" else COS_SIN_ATOL
    torch.testing.assert_close(cos_btd, hf_cos_btd, rtol=0, atol=atol)
    torch.testing.assert_close(sin_btd, hf_sin_btd, rtol=0, atol=atol)

    if rope.scaling == "dynamic_ntk":
        assert int(positions_bt.max()) + 1 > original
        # Explicit global seq_len (what a context-parallel rank passes) equals the inferred one.
        explicit = ours(positions_bt, seq_len=int(positions_bt.max()) + 1)
        torch.testing.assert_close(explicit, (cos_btd, sin_btd), rtol=0, atol=0)
        # Below the original length nothing is rescaled.
        short_bt = torch.randint(0, original, (2, 48), generator=gen)
        plain = RotaryEmbedding(
            RopeConfig(theta=rope.theta), head_dim=HEAD_DIM, max_position_embeddings=max_pos
        )
        torch.testing.assert_close(
            ours(short_bt, seq_len=original), plain(short_bt), rtol=0, atol=0
        )


def test_rotary_embedding_survives_dtype_cast_and_meta_init() -> None:
    rope = RopeConfig(scaling="yarn", factor=4.0, original_max_position_embeddings=512)
    module = RotaryEmbedding(rope, head_dim=HEAD_DIM, max_position_embeddings=2048)
    expected_f = module.inv_freq.clone()
    module.to(torch.bfloat16)
    assert module.inv_freq.dtype == torch.float32
    torch.testing.assert_close(module.inv_freq, expected_f, rtol=0, atol=0)
    assert "inv_freq" not in module.state_dict()

    # Large models are built on the meta device and materialized with to_empty().
    with torch.device("meta"):
        lazy = RotaryEmbedding(rope, head_dim=HEAD_DIM, max_position_embeddings=2048)
    lazy.to_empty(device="cpu")
    torch.testing.assert_close(lazy.inv_freq, expected_f, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_rotary_matches_transformers(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    b, t, h, d = 2, 24, 3, HEAD_DIM
    rope = RopeConfig(scaling="yarn", factor=4.0, original_max_position_embeddings=256)
    positions_bt = torch.randint(0, 1024, (b, t), generator=gen)
    cos_btd, sin_btd = RotaryEmbedding(rope, head_dim=d, max_position_embeddings=1024)(positions_bt)
    x_bthd = torch.randn(b, t, h, d, generator=gen).to(dtype)

    out_bthd = apply_rotary(x_bthd, cos_btd, sin_btd)
    assert out_bthd.dtype == dtype and out_bthd.shape == x_bthd.shape

    # transformers wants [B, H, T, D] with unsqueeze_dim=1; reference computed in float32.
    x_bhtd = x_bthd.float().transpose(1, 2)
    ref_bhtd, _ = apply_rotary_pos_emb(x_bhtd, x_bhtd, cos_btd, sin_btd, unsqueeze_dim=1)
    ref_bthd = ref_bhtd.transpose(1, 2)
    if dtype == torch.float32:
        torch.testing.assert_close(out_bthd, ref_bthd, rtol=1e-6, atol=1e-6)
    else:
        # Only the final rounding differs from the float32 reference.
        torch.testing.assert_close(out_bthd, ref_bthd.to(dtype), rtol=0, atol=0)


def test_apply_rotary_depends_only_on_relative_position() -> None:
    gen = torch.Generator().manual_seed(2)
    rope_emb = RotaryEmbedding(RopeConfig(), head_dim=HEAD_DIM, max_position_embeddings=4096)
    q_bthd = torch.randn(1, 1, 1, HEAD_DIM, generator=gen)
    k_bthd = torch.randn(1, 1, 1, HEAD_DIM, generator=gen)
    scores = []
    for offset in (0, 100, 1000):
        cos_q, sin_q = rope_emb(torch.tensor([[offset + 7]]))
        cos_k, sin_k = rope_emb(torch.tensor([[offset + 2]]))
        scores.append((apply_rotary(q_bthd, cos_q, sin_q) * apply_rotary(k_bthd, cos_k, sin_k)).sum())
    # float32 angles at position ~1000 are only good to ~1e-4.
    torch.testing.assert_close(torch.stack(scores), scores[0].expand(3), rtol=1e-4, atol=1e-4)


def _canonical(rope: RopeConfig, max_pos: int) -> RopeConfig:
    # What must survive export + import: the fields the method reads, with the original
    # length resolved; "abf" is plain RoPE with a larger theta, so it reads back as "none".
    scaling = "none" if rope.scaling == "abf" else rope.scaling
    kept = {name: getattr(rope, name) for name in RELEVANT_FIELDS[scaling]}
    if "original_max_position_embeddings" in kept and kept["original_max_position_embeddings"] is None:
        kept["original_max_position_embeddings"] = max_pos
    return RopeConfig(scaling=scaling, **kept)


@pytest.mark.parametrize(("name", "rope", "max_pos"), CASES, ids=CASE_IDS)
def test_round_trip(name: str, rope: RopeConfig, max_pos: int) -> None:
    hf_keys = _hf_dict(rope, max_pos)
    back = rope_from_hf(hf_keys)
    assert back == _canonical(rope, max_pos)
    # And the model built from the imported config (with the HF file's max length) is identical.
    seq_len = 5 * max_pos if rope.scaling == "dynamic_ntk" else None
    ours = rope_inv_freq(rope, head_dim=HEAD_DIM, max_position_embeddings=max_pos, seq_len=seq_len)
    again = rope_inv_freq(
        back,
        head_dim=HEAD_DIM,
        max_position_embeddings=hf_keys["max_position_embeddings"],
        seq_len=seq_len,
    )
    torch.testing.assert_close(again[0], ours[0], rtol=0, atol=0)
    assert again[1] == ours[1]


def test_dynamic_exports_original_length_as_hf_max() -> None:
    rope = RopeConfig(scaling="dynamic_ntk", factor=2.0, original_max_position_embeddings=512)
    keys = rope_to_hf(rope, max_position_embeddings=4096)
    assert keys["max_position_embeddings"] == 512
    assert keys["rope_scaling"] == {"type": "dynamic", "rope_type": "dynamic", "factor": 2.0}


def test_none_and_abf_export_plain_rope() -> None:
    keys = rope_to_hf(RopeConfig(scaling="abf", theta=500000.0), max_position_embeddings=4096)
    assert keys == {
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    }


LEGACY_CASES: list[tuple[str, dict[str, Any], RopeConfig]] = [
    (
        "linear-type",
        {
            "max_position_embeddings": 4096,
            "rope_theta": 1e6,
            "rope_scaling": {"type": "linear", "factor": 2.0},
        },
        RopeConfig(scaling="linear", theta=1e6, factor=2.0),
    ),
    (
        "dynamic-type",
        {"max_position_embeddings": 2048, "rope_scaling": {"type": "dynamic", "factor": 3.0}},
        RopeConfig(scaling="dynamic_ntk", factor=3.0, original_max_position_embeddings=2048),
    ),
    (
        "llama3.1",
        {
            "max_position_embeddings": 131072,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
        },
        RopeConfig(scaling="llama3", theta=500000.0, factor=8.0, original_max_position_embeddings=8192),
    ),
    (
        "yarn-no-original",
        {
            "max_position_embeddings": 4096,
            "rope_theta": 1e6,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
        },
        RopeConfig(scaling="yarn", theta=1e6, factor=4.0, original_max_position_embeddings=4096),
    ),
    (
        "plain-no-rope-keys",
        {"max_position_embeddings": 2048},
        RopeConfig(),
    ),
    (
        "scaling-wins-over-parameters",
        {
            "max_position_embeddings": 2048,
            "rope_theta": 2e5,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        },
        RopeConfig(scaling="linear", theta=2e5, factor=2.0),
    ),
    (
        "parameters-when-scaling-null",
        {
            "max_position_embeddings": 2048,
            "rope_scaling": None,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0, "truncate": False},
        },
        RopeConfig(
            scaling="yarn",
            theta=1e6,
            factor=2.0,
            truncate=False,
            original_max_position_embeddings=2048,
        ),
    ),
]


@pytest.mark.parametrize(("name", "hf_keys", "expected"), LEGACY_CASES, ids=[c[0] for c in LEGACY_CASES])
def test_rope_from_hf_reads_like_transformers(
    name: str, hf_keys: dict[str, Any], expected: RopeConfig
) -> None:
    rope = rope_from_hf(hf_keys)
    assert rope == expected
    # Whatever we read must give the frequencies transformers itself derives from that file.
    hf_config = _llama_config(hf_keys)
    max_pos = hf_keys["max_position_embeddings"]
    seq_len = 3 * max_pos if rope.scaling == "dynamic_ntk" else None
    ours = rope_inv_freq(rope, head_dim=HEAD_DIM, max_position_embeddings=max_pos, seq_len=seq_len)
    _assert_inv_freq_close(ours, _hf_inv_freq(hf_config, seq_len), what=name)


@pytest.mark.parametrize(
    ("rope", "field"),
    [
        (RopeConfig(scaling="ntk_by_parts"), "rope.scaling"),
        (RopeConfig(scaling="linear", factor=0.5), "rope.factor"),
        (RopeConfig(scaling="yarn", factor=0.9), "rope.factor"),
        (RopeConfig(scaling="dynamic_ntk", factor=0.0), "rope.factor"),
        (
            RopeConfig(scaling="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=4.0),
            "rope.high_freq_factor",
        ),
        (RopeConfig(theta=0.0), "rope.theta"),
        (
            RopeConfig(scaling="yarn", factor=2.0, original_max_position_embeddings=0),
            "rope.original_max_position_embeddings",
        ),
    ],
)
def test_bad_config_names_the_field(rope: RopeConfig, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        rope_inv_freq(rope, head_dim=HEAD_DIM, max_position_embeddings=2048)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        RotaryEmbedding(rope, head_dim=HEAD_DIM, max_position_embeddings=2048)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        rope_to_hf(rope, max_position_embeddings=2048)


def test_bad_config_message_names_the_value() -> None:
    with pytest.raises(ValueError, match="'ntk_by_parts'"):
        rope_inv_freq(RopeConfig(scaling="ntk_by_parts"), head_dim=HEAD_DIM, max_position_embeddings=2048)
    with pytest.raises(ValueError, match="0.5"):
        rope_inv_freq(
            RopeConfig(scaling="linear", factor=0.5), head_dim=HEAD_DIM, max_position_embeddings=2048
        )


def test_odd_head_dim_is_rejected() -> None:
    with pytest.raises(ValueError, match="head_dim=7"):
        rope_inv_freq(RopeConfig(), head_dim=7, max_position_embeddings=2048)


@pytest.mark.parametrize(
    ("hf_keys", "needle"),
    [
        ({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}, "longrope"),
        ({"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4}}, "proportional"),
        (
            {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
            "partial_rotary_factor",
        ),
        ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
        (
            {
                "rope_parameters": {
                    "full_attention": {"rope_type": "default"},
                    "sliding_attention": {"rope_type": "default"},
                }
            },
            "per-layer",
        ),
    ],
)
def test_rope_from_hf_rejects_unsupported(hf_keys: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        rope_from_hf(hf_keys)


def test_every_scaling_is_covered() -> None:
    covered = {rope.scaling for _, rope, _ in CASES}
    assert covered == {"none", "abf", "linear", "dynamic_ntk", "yarn", "llama3"}
    assert all(dataclasses.is_dataclass(rope) for _, rope, _ in CASES)
