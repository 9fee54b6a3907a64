"""The attention backend interface and its registry.

Shapes: B batch, T local sequence length, Hq query heads, Hkv key/value heads (GQA: Hq is a
multiple of Hkv), D head dim.

A backend is `fn(q_bthd, k_bthd, v_bthd, meta, ctx) -> out_bthd` with q `[B, T, Hq, D]`,
k/v `[B, T, Hkv, D]` and out `[B, T, Hq, D]`, all in the input dtype. Every backend computes
the same function as dense attention on the unsharded sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch


@dataclass(frozen=True)
class AttentionMeta:
    """Per-batch facts the mask depends on. Tensors are local to this rank's sequence shard."""

    causal: bool = True
    # [B, T] int64 true positions (restart per packed document)
    positions_bt: Optional[torch.Tensor] = None
    # [B, T] int64 document ids: attention never crosses a document boundary
    doc_ids_bt: Optional[torch.Tensor] = None
    # 1/sqrt(D) when None
    softmax_scale: Optional[float] = None
    # global index of this rank's first query head (tensor parallelism slices the heads;
    # head-dependent patterns such as s2's are defined on global heads)
    head_offset: int = 0


@dataclass(frozen=True)
class AttentionContext:
    """Where this rank sits in the context-parallel group and how the sequence is laid out."""

    cp_group: Any = None
    cp_size: int = 1
    cp_rank: int = 0
    layout: str = "zigzag"
    # 2-D context parallelism (ulysses_ring): the all-to-all group (consecutive CP ranks) and
    # the ring group (same position in every all-to-all group)
    ulysses_group: Any = None
    ring_group: Any = None


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMeta, AttentionContext],
                       torch.Tensor]

_REGISTRY: dict[str, AttentionFn] = {}
# Backends that shard the sequence themselves; the others need cp == 1.
_SUPPORTS_CP: dict[str, bool] = {}


def register_attention(name: str, *, supports_cp: bool) -> Callable[[AttentionFn], AttentionFn]:
    def wrap(fn: AttentionFn) -> AttentionFn:
        _REGISTRY[name] = fn
        _SUPPORTS_CP[name] = supports_cp
        return fn

    return wrap


def _load_builtin() -> None:
    # Importing the backend modules registers them.
    from longtrain.attention import dense, linear, ring, ulysses  # noqa: F401


# backends built per model (model_attention), not looked up by name
_CONFIGURED = ("lasp1", "lasp2", "s2")


def attention_names() -> list[str]:
    """Every `attention.backend`: the softmax backends, s2 and the linear-attention methods."""
    _load_builtin()
    return sorted([*_REGISTRY, *_CONFIGURED])


def supports_cp(name: str) -> bool:
    _load_builtin()
    return name in _CONFIGURED or _SUPPORTS_CP.get(name, False)


def get_attention(name: str) -> AttentionFn:
    """The softmax attention backend `name`."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"attention.backend={name!r} is not one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def model_attention(attention: Any, model: Any) -> tuple[list[AttentionFn], Any]:
    """(each layer's softmax attention, the linear layers' method or None) for the
    `attention` and `model` configs: a linear method (lasp1 | lasp2) takes `attention.softmax`
    for a hybrid's softmax layers; s2 keeps the layers `attention.s2` names dense (dense, or
    ring under CP)."""
    from longtrain.attention.linear import LINEAR_BACKENDS, linear_attention

    backend = attention.backend
    if backend in LINEAR_BACKENDS:
        return [get_attention(attention.softmax)] * model.num_layers, linear_attention(backend)
    if backend == "s2":
        from longtrain.attention.s2 import (dense_layers, dense_or_ring, make_s2_attention,
                                            s2_pattern)

        sparse = make_s2_attention(s2_pattern(attention.s2, model.num_heads))
        return [dense_or_ring if dense else sparse
                for dense in dense_layers(attention.s2, model.num_layers)], None
    return [get_attention(backend)] * model.num_layers, None
