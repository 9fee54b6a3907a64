"""The attention backends, listed once: `attention.backend` names one of these specs.

A new backend is one module exporting its `BackendSpec` plus one line in `_BUILTIN`. Nothing
registers itself at import; `register_backend` / `register_attention` add a spec at run time
for tests and extensions.
"""

from __future__ import annotations

from typing import Callable

from longtrain.attention import allgather, dense, linear, ring, s2, ulysses
from longtrain.attention.dense import no_comm, softmax_forward_flops
from longtrain.attention.types import AttentionFn, BackendSpec

_BUILTIN: tuple[BackendSpec, ...] = (
    dense.SPEC,
    ring.SPEC,
    ulysses.ULYSSES,
    ulysses.ULYSSES_RING,
    allgather.SPEC,
    s2.SPEC,
    linear.LASP1,
    linear.LASP2,
)

TABLE: dict[str, BackendSpec] = {spec.name: spec for spec in _BUILTIN}


def attention_names() -> list[str]:
    """Every `attention.backend`: the softmax backends, s2 and the linear-attention methods."""
    return sorted(TABLE)


def get_spec(name: str) -> BackendSpec:
    if name not in TABLE:
        raise ValueError(f"attention.backend={name!r} is not one of {attention_names()}")
    return TABLE[name]


def supports_cp(name: str) -> bool:
    return name in TABLE and TABLE[name].shards_sequence


def get_attention(name: str) -> AttentionFn:
    """The softmax attention backend `name` (one that needs no model config to build)."""
    spec = TABLE.get(name)
    if spec is None or spec.kind != "softmax" or spec.layer_specs is not None:
        softmax = sorted(n for n, s in TABLE.items()
                         if s.kind == "softmax" and s.layer_specs is None)
        raise ValueError(f"attention.backend={name!r} is not one of {softmax}")
    return spec.build(None, None)


def register_backend(spec: BackendSpec) -> BackendSpec:
    """Add (or replace) a backend at run time, for tests and extensions; the built-in ones
    are listed in `_BUILTIN`. Only this process sees it."""
    TABLE[spec.name] = spec
    return spec


def register_attention(name: str, *, supports_cp: bool) -> Callable[[AttentionFn], AttentionFn]:
    """Decorator: add the softmax attention function as backend `name` (for tests and
    extensions), with dense attention's FLOPs and no communication model."""

    def wrap(fn: AttentionFn) -> AttentionFn:
        register_backend(BackendSpec(name=name, kind="softmax", shards_sequence=supports_cp,
                                     build=lambda attention, model: fn,
                                     forward_flops=softmax_forward_flops,
                                     comm=None if supports_cp else no_comm))
        return fn

    return wrap
