"""Pre-flight validation: every impossible setting is reported, each message naming the
fields and values involved, all of them at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from longtrain.config.errors import ConfigError
from longtrain.config.schema import RunConfig
from longtrain.planning.validate import problems, validate
from longtrain.parallel.dims import ParallelDims


def _cfg(**overrides: Any) -> RunConfig:
    """RunConfig with dotted overrides: _cfg(**{"parallel.tp": 2})."""
    cfg = RunConfig()
    for dotted, value in overrides.items():
        *path, leaf = dotted.split(".")
        obj: Any = cfg
        for part in path:
            obj = getattr(obj, part)
        if isinstance(obj, dict):
            obj[leaf] = value
        else:
            assert hasattr(obj, leaf), dotted
            setattr(obj, leaf, value)
    return cfg


def _matching(found: list[str], fragments: list[str]) -> list[str]:
    return [p for p in found if all(f in p for f in fragments)]


# (id, overrides, [fragments that one single message must contain], ...)
CASES: list[tuple[str, dict[str, Any], list[list[str]]]] = [
    ("world_not_divisible_by_tp_cp",
     {"parallel.world_size": 3, "parallel.tp": 2},
     [["parallel.world_size=3", "parallel.tp * parallel.cp = 2 * 1 = 2"]]),
    ("world_not_divisible_by_tp_times_cp",
     {"parallel.world_size": 6, "parallel.tp": 2, "parallel.cp": 2},
     [["parallel.world_size=6", "2 * 2 = 4"], ["attention.backend='dense'", "parallel.cp=2"]]),
    # num_heads % tp != 0 forces num_kv_heads % tp != 0 (heads are a multiple of kv heads).
    ("num_heads_not_divisible_by_tp",
     {"model.num_heads": 3, "model.num_kv_heads": 1, "model.hidden_size": 96,
      "parallel.world_size": 2, "parallel.tp": 2},
     [["model.num_heads=3", "parallel.tp=2"], ["model.num_kv_heads=1", "parallel.tp=2"]]),
    ("num_kv_heads_not_divisible_by_tp",
     {"model.num_heads": 6, "model.num_kv_heads": 3, "model.hidden_size": 96,
      "parallel.world_size": 2, "parallel.tp": 2},
     [["model.num_kv_heads=3", "parallel.tp=2"]]),
    ("gqa_groups_unequal",
     {"model.num_heads": 4, "model.num_kv_heads": 3},
     [["model.num_heads=4", "model.num_kv_heads=3"]]),
    ("intermediate_not_divisible_by_tp",
     {"model.intermediate_size": 385, "parallel.tp": 2},
     [["model.intermediate_size=385", "parallel.tp=2"]]),
    ("odd_head_dim",
     {"model.head_dim": 15},
     [["head dim 15", "model.head_dim"]]),
    ("seq_len_not_divisible_by_2",
     {"data.seq_len": 1025},
     [["data.seq_len=1025", "2 * parallel.cp = 2"]]),
    ("seq_len_not_divisible_by_2cp_and_dense_cp",
     {"data.seq_len": 1026, "parallel.cp": 2},
     [["data.seq_len=1026", "2 * parallel.cp = 4"],
      ["attention.backend='dense'", "parallel.cp=2"]]),
    ("dense_with_cp",
     {"parallel.cp": 2},
     [["attention.backend='dense'", "parallel.cp=2"]]),
    ("seq_len_too_short_for_passkey",
     {"data.seq_len": 64},
     [["data.seq_len=64", "passkey"]]),
    ("batch_not_divisible_by_dp",
     {"data.batch_size": 5},
     [["data.batch_size=5", "data parallel size 2", "data.micro_batch_size=1"]]),
    ("batch_not_divisible_by_dp_times_micro",
     {"data.batch_size": 4, "data.micro_batch_size": 4},
     [["data.batch_size=4", "data parallel size 2", "data.micro_batch_size=4"]]),
    ("unknown_attention_backend",
     {"attention.backend": "flash_magic"},
     [["attention.backend='flash_magic'", "dense"]]),
    ("bad_precision",
     {"train.precision": "fp16"},
     [["train.precision='fp16'", "'fp32'", "'bf16'"]]),
    ("unknown_kernels",
     {"train.kernels": "cuda"},
     [["train.kernels='cuda'", "'auto'", "'triton'", "'torch'"]]),
    ("unknown_rope_scaling",
     {"rope.scaling": "ntk_by_parts"},
     [["rope.scaling='ntk_by_parts'", "yarn"]]),
    ("rope_factor_below_one",
     {"rope.scaling": "linear", "rope.factor": 0.5},
     [["rope.factor", "0.5", "linear"]]),
    ("bad_schedule",
     {"optim.schedule": "step"},
     [["optim.schedule='step'", "cosine"]]),
    ("zero_stage_4",
     {"optim.zero": 4},
     [["optim.zero=4", "[0, 1, 2, 3]"]]),
    ("unknown_init_key",
     {"init.form": "/tmp"},
     [["init.form", "from"]]),
]


@pytest.mark.parametrize("overrides,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_problem_names_fields_and_values(overrides: dict[str, Any],
                                              expected: list[list[str]]) -> None:
    found = problems(_cfg(**overrides))
    for fragments in expected:
        assert _matching(found, fragments), f"no message with {fragments} in {found}"
    # Nothing but the expected problems: one message each.
    assert len(found) == len(expected), found


def test_init_from_missing_dir_and_dir_without_config(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    found = problems(_cfg(**{"init.from": str(missing)}))
    assert found == [f"init.from={str(missing)!r} does not exist (expected a Hugging Face model "
                     f"directory or a longtrain checkpoint)"]
    found = problems(_cfg(**{"init.from": str(tmp_path)}))
    assert len(found) == 1 and f"init.from={str(tmp_path)!r}" in found[0]
    assert "config.json" in found[0]
    (tmp_path / "config.json").write_text("{}")
    assert problems(_cfg(**{"init.from": str(tmp_path)})) == []


def test_default_config_is_valid() -> None:
    cfg = RunConfig()
    assert problems(cfg) == []
    dims = validate(cfg)
    assert dims == ParallelDims(cfg.parallel.world_size, cfg.parallel.tp, cfg.parallel.cp)
    assert dims.dp == cfg.parallel.world_size


@pytest.mark.parametrize("overrides", [
    {"parallel.world_size": 4, "parallel.tp": 2},
    {"parallel.world_size": 8, "parallel.tp": 2, "data.batch_size": 8,
     "data.micro_batch_size": 2},
    {"rope.scaling": "yarn", "rope.factor": 8.0, "data.seq_len": 4096},
    {"train.precision": "bf16", "data.seq_len": 190},
], ids=["tp2", "tp2xdp4_micro2", "yarn", "bf16_short"])
def test_valid_layouts_have_no_problems(overrides: dict[str, Any]) -> None:
    assert problems(_cfg(**overrides)) == []


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    cfg = _cfg(**{
        "parallel.world_size": 3, "parallel.tp": 2,
        "model.num_heads": 6, "model.num_kv_heads": 3, "model.hidden_size": 96,
        "train.precision": "fp16",
        "attention.backend": "nope",
        "rope.scaling": "bogus",
        "data.seq_len": 1023,
        "init.from": str(tmp_path / "missing"),
    })
    found = problems(cfg)
    for fragments in (["parallel.world_size=3"], ["model.num_kv_heads=3", "parallel.tp=2"],
                      ["train.precision='fp16'"], ["attention.backend='nope'"],
                      # A model problem must not hide a rope problem.
                      ["rope.scaling='bogus'"], ["data.seq_len=1023"], ["init.from="]):
        assert _matching(found, fragments), f"no message with {fragments} in {found}"
    assert len(found) == 7, found


def test_validate_raises_one_config_error_with_every_problem() -> None:
    cfg = _cfg(**{"train.precision": "fp16", "rope.scaling": "bogus", "data.batch_size": 5})
    expected = problems(cfg)
    assert len(expected) == 3
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert isinstance(info.value, ValueError)
    assert info.value.problems == expected
    message = str(info.value)
    assert "3 problem(s)" in message
    assert all(p in message for p in expected)
