"""The types every attention backend shares; this module imports no backend.

Shapes: B batch, T local sequence length, Hq query heads, Hkv key/value heads (GQA: Hq is a
multiple of Hkv), D head dim.

A backend's function is `fn(q_bthd, k_bthd, v_bthd, meta, ctx) -> out_bthd` with q
`[B, T, Hq, D]`, k/v `[B, T, Hkv, D]` and out `[B, T, Hq, D]`, all in the input dtype. Every
backend computes the same function as dense attention on the unsharded sequence. A
linear-attention method also takes the layer's per-head log decay `[H]` after v.

A backend is one `BackendSpec` (its facts and its build function), defined in the backend's
own module and listed in `longtrain.attention.table`.
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
    # the kernels setting (train.kernels: auto | triton | torch) the backends dispatch with
    kernels: str = "auto"


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMeta, AttentionContext],
                       torch.Tensor]
LinearAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              AttentionMeta, AttentionContext], torch.Tensor]

# a spec's cost functions (see BackendSpec)
FlopsFn = Callable[..., float]
CommFn = Callable[..., tuple[float, Any]]


def no_problems(cfg: Any) -> list[str]:
    return []


def no_cp_groups(attention: Any, cp: int) -> Optional[tuple[int, int]]:
    return None


def causal_share(seq_len: int, c: int) -> float:
    return 1.0


@dataclass(frozen=True)
class BackendSpec:
    """One attention backend: everything the model, `--check`, the FLOP counter, the cost
    model and the memory planner need to know about it.

    - `kind`: the layers it serves, "softmax" or "linear".
    - `shards_sequence`: it runs under context parallelism (parallel.cp > 1).
    - `cp_sizes(attention_cfg, cp)`: the 2-D CP groups it needs, `(ulysses, ring)`, or None.
    - `problems(run_cfg)`: what is wrong with the run config for this backend (field names
      and values in each message).
    - `forward_flops(*, t, heads, head_dim, attention)`: forward FLOPs of one layer on one
      length-t sequence (`heads` the model's query heads, `attention` the attention config).
    - `compute_factor(seq_len, c)`: FLOPs it computes over `forward_flops` on c ranks (a mask
      applied instead of skipping the future costs more).
    - `comm(shape, *, c, link, fwd_attention_s, attention)`: exposed CP seconds of one layer's
      forward + backward on one rank (`shape` a `parallel.collective_cost.AttentionShape`),
      and a `RingDetail` or None. None: no communication model (the cost model refuses cp > 1).
    - `build(attention_cfg, model_cfg)`: the layer function (`AttentionFn`, or
      `LinearAttentionFn` for kind "linear").
    - `describe(cp)`: how `--check` names a layer it runs (default: the name).
    - `layer_specs(attention_cfg, num_layers)`: per layer, another spec that runs that
      (softmax) layer instead, or None (s2 keeps some layers dense); None: every layer.
    """

    name: str
    kind: str
    shards_sequence: bool
    build: Callable[[Any, Any], Callable[..., torch.Tensor]]
    forward_flops: FlopsFn
    comm: Optional[CommFn]
    compute_factor: Callable[[int, int], float] = causal_share
    problems: Callable[[Any], list[str]] = no_problems
    cp_sizes: Callable[[Any, int], Optional[tuple[int, int]]] = no_cp_groups
    describe: Optional[Callable[[int], str]] = None
    layer_specs: Optional[Callable[[Any, int], list[Optional["BackendSpec"]]]] = None

    def label(self, cp: int) -> str:
        return self.describe(cp) if self.describe is not None else self.name


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer runs: its kind (softmax | linear), the backend spec, and the
    label `--check` prints for it."""

    index: int
    kind: str
    spec: BackendSpec
    label: str
