"""The per-layer plan: which backend spec each decoder layer runs, decided once.

The model build, `--check`, the FLOP counter, the cost model and the memory planner all read
`plan_layers`; none of them decides by a backend's name.
"""

from __future__ import annotations

from typing import Any, Optional

from longtrain.attention.linear import LASP2
from longtrain.attention.table import TABLE, get_spec
from longtrain.attention.types import AttentionFn, BackendSpec, LayerPlan, LinearAttentionFn
from longtrain.config.pattern import layer_kinds

# the linear layers of a model whose attention.backend is a softmax one (a configuration
# validation rejects; the model still builds with LASP-2 so --check can describe it)
DEFAULT_LINEAR = LASP2


def is_linear_backend(name: str) -> bool:
    """attention.backend names a linear-attention method (False for an unknown name)."""
    return name in TABLE and TABLE[name].kind == "linear"


def _unknown(name: str) -> BackendSpec:
    """Stands for a name no spec has, so `--check` can still describe the layers."""

    def build(attention: Any, model: Any) -> Any:
        get_spec(name)

    return BackendSpec(name=name, kind="softmax", shards_sequence=False, build=build,
                       forward_flops=TABLE["dense"].forward_flops, comm=None)


def plan_layers(attention: Any, model: Any, *, cp: int = 1, strict: bool = True
                ) -> list[LayerPlan]:
    """One `LayerPlan` per layer of the `model` config under the `attention` config.

    Linear layers (model.layer_pattern) run a linear backend: attention.backend when it is
    one, else LASP-2. Softmax layers run attention.softmax under a linear backend (hybrids),
    else attention.backend, or the spec it names for that layer (s2's dense layers). `cp`
    only changes the labels `--check` prints. An unknown name raises ValueError, or with
    `strict=False` (`--check` describing an invalid config) plans a placeholder spec.
    """
    def lookup(name: str) -> BackendSpec:
        return get_spec(name) if strict or name in TABLE else _unknown(name)

    spec = lookup(attention.backend)
    kinds = layer_kinds(model, linear_default=spec.kind == "linear")
    instead = (spec.layer_specs(attention, len(kinds)) if spec.layer_specs is not None
               else [None] * len(kinds))
    out = []
    for i, kind in enumerate(kinds):
        if kind == "linear":
            run = spec if spec.kind == "linear" else DEFAULT_LINEAR
            label = f"linear ({run.name})"
        elif spec.kind == "linear":
            run = lookup(attention.softmax)
            label = f"softmax ({attention.softmax})"
        else:
            run = instead[i] or spec
            label = run.label(cp)
        out.append(LayerPlan(index=i, kind=kind, spec=run, label=label))
    return out


def build_layers(plan: list[LayerPlan], attention: Any, model: Any
                 ) -> tuple[list[Optional[AttentionFn]], Optional[LinearAttentionFn]]:
    """(each layer's softmax attention, None on linear layers; the linear layers' method or
    None) for `LlamaModel(attention=..., linear_attention=...)`, each spec built once."""
    built: dict[str, Any] = {}

    def fn(spec: BackendSpec) -> Any:
        if spec.name not in built:
            built[spec.name] = spec.build(attention, model)
        return built[spec.name]

    softmax = [fn(p.spec) if p.kind == "softmax" else None for p in plan]
    linear = {p.spec.name: p.spec for p in plan if p.kind == "linear"}
    assert len(linear) <= 1, f"one linear method per model, planned {sorted(linear)}"
    return softmax, (fn(next(iter(linear.values()))) if linear else None)


def model_attention(attention: Any, model: Any
                    ) -> tuple[list[Optional[AttentionFn]], Optional[LinearAttentionFn]]:
    """`build_layers(plan_layers(attention, model), ...)`."""
    return build_layers(plan_layers(attention, model), attention, model)


def cp_group_sizes(attention: Any, cp: int) -> Optional[tuple[int, int]]:
    """`init_parallel(cp_sizes=...)` for attention.backend: (ulysses, ring) or None (no 2-D
    groups; also for a name this process has no spec for)."""
    spec = TABLE.get(attention.backend)
    return None if spec is None else spec.cp_sizes(attention, cp)
