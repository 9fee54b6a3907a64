"""The attention interface under its historical import path.

The types live in `longtrain.attention.types` (which imports no backend), the backends in
`longtrain.attention.table`, the per-layer plan in `longtrain.attention.plan`; this module
re-exports them for the code and tests that import from here.
"""

from __future__ import annotations

from longtrain.attention.plan import model_attention
from longtrain.attention.table import (attention_names, get_attention, get_spec,
                                       register_attention, register_backend, supports_cp)
from longtrain.attention.types import (AttentionContext, AttentionFn, AttentionMeta, BackendSpec,
                                       LayerPlan, LinearAttentionFn)

__all__ = ["AttentionContext", "AttentionFn", "AttentionMeta", "BackendSpec", "LayerPlan",
           "LinearAttentionFn", "attention_names", "get_attention", "get_spec",
           "model_attention", "register_attention", "register_backend", "supports_cp"]
