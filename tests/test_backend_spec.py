"""An attention backend is one BackendSpec in one table; the per-layer plan reads it.

A toy backend defined here (one spec, added to the table at run time) shows up in `--check`'s
per-layer report, the FLOP counter and the cost model without any other edit.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from longtrain.attention.dense import dense_attention
from longtrain.attention.plan import plan_layers
from longtrain.attention.table import TABLE, attention_names, register_backend
from longtrain.attention.types import BackendSpec
from longtrain.planning.preflight import attention_lines
from longtrain.config.schema import RunConfig
from longtrain.model.flops import step_flops
from longtrain.planning.cluster import cluster_from_config
from longtrain.planning.costmodel import predict

TOY_FLOPS = 1.0e9
TOY_COMM_S = 0.25


def _toy_flops(*, t: int, heads: int, head_dim: int, attention) -> float:
    return TOY_FLOPS


def _toy_comm(s, *, c: int, link, fwd_attention_s: float, attention):
    return (TOY_COMM_S if c > 1 else 0.0), None


TOY = BackendSpec(name="toy", kind="softmax", shards_sequence=True,
                  build=lambda attention, model: dense_attention,
                  forward_flops=_toy_flops, comm=_toy_comm,
                  problems=lambda cfg: ["attention.backend='toy' is only a test"],
                  describe=lambda cp: f"toy (cp={cp})")


@pytest.fixture
def toy():
    register_backend(TOY)
    yield TOY
    del TABLE["toy"]


def _cfg(backend: str, *, cp: int = 1) -> RunConfig:
    cfg = RunConfig()
    cfg.attention.backend = backend
    cfg.parallel.cp = cp
    return cfg


def test_every_table_entry_has_every_field() -> None:
    assert sorted(TABLE) == attention_names()
    for name, spec in TABLE.items():
        assert spec.name == name
        assert spec.kind in ("softmax", "linear")
        assert isinstance(spec.shards_sequence, bool)
        for field in dataclasses.fields(BackendSpec):
            if field.name in ("describe", "layer_specs"):
                continue
            assert getattr(spec, field.name) is not None, (name, field.name)
        for fn in (spec.build, spec.forward_flops, spec.comm, spec.compute_factor,
                   spec.problems, spec.cp_sizes):
            assert callable(fn), name


def test_a_toy_backend_appears_in_check_flops_and_cost_model(toy: BackendSpec) -> None:
    assert "toy" in attention_names()
    cfg = _cfg("toy", cp=2)
    n = cfg.model.num_layers
    assert [p.spec for p in plan_layers(cfg.attention, cfg.model)] == [toy] * n
    assert attention_lines(cfg) == [f"attention per layer ({n} layers): 0-{n - 1}: toy (cp=2)"]

    flops = step_flops(cfg)
    assert flops.attention == 3.0 * TOY_FLOPS * n * cfg.data.batch_size
    dense = step_flops(_cfg("dense"))
    assert flops.matmul == dense.matmul

    from longtrain.planning.validate import problems

    assert "attention.backend='toy' is only a test" in problems(cfg)

    cfg.cluster.preset = "h100-1x8"
    cfg.parallel.world_size, cfg.data.batch_size = 8, 8
    pred = predict(cfg, cluster_from_config(cfg))
    micro = cfg.data.batch_size // (cfg.parallel.world_size // 2 * cfg.data.micro_batch_size)
    assert pred.comm_s["cp"] == pytest.approx(micro * TOY_COMM_S * n)


def test_importing_the_types_imports_no_backend() -> None:
    code = ("import sys; import longtrain.attention.types; "
            "print(sorted(m for m in sys.modules if m.startswith('longtrain.attention.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['longtrain.attention.types']"


def test_the_table_imports_without_a_cycle() -> None:
    # each backend module first, on its own: none needs the table (or base) to import
    for mod in ("dense", "ring", "ulysses", "allgather", "linear", "s2", "table", "plan"):
        code = (f"import sys; import longtrain.attention.{mod}; "
                f"assert 'longtrain.attention.base' not in sys.modules; "
                f"assert ('longtrain.attention.table' in sys.modules) == ({mod!r} in "
                f"('table', 'plan'))")
        subprocess.run([sys.executable, "-c", code], check=True)
