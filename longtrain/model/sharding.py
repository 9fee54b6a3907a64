"""Canonical weights <-> this TP rank's shards.

The canonical form is the Hugging Face Llama state dict (full, unsharded tensors named
`model.layers.0.self_attn.q_proj.weight`, ...). Every way weights enter or leave a model goes
through here: seeded initialization (identical at every TP size), Hugging Face import, export.

A `ShardSpec` says how one local parameter is made of canonical tensors: the canonical
`pieces` (several for fused q|k|v and gate|up) are each cut into `tp` equal parts along `dim`
and this rank's parts are concatenated along that dim; `dim=None` means replicated.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from longtrain.config.schema import ModelConfig
from longtrain.model.llama import LlamaModel, layer_kinds


@dataclass(frozen=True)
class ShardSpec:
    local_name: str
    pieces: tuple[str, ...]
    # None: replicated on every TP rank
    dim: Optional[int]
    # canonical rows to pad to (vocabulary padding for TP), along dim 0
    padded_rows: Optional[int] = None


def shard_specs(model: LlamaModel) -> list[ShardSpec]:
    cfg = model.cfg
    padded = model.shape.padded_vocab_size
    specs = [ShardSpec("embed.weight", ("model.embed_tokens.weight",), 0, padded)]
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", f"layers.{i}"
        attn = f"{hf}.self_attn"
        specs += [
            ShardSpec(f"{ours}.attn_norm.weight", (f"{hf}.input_layernorm.weight",), None),
            ShardSpec(f"{ours}.attn.qkv.weight",
                      tuple(f"{attn}.{p}_proj.weight" for p in "qkv"), 0),
            ShardSpec(f"{ours}.attn.out.weight", (f"{attn}.o_proj.weight",), 1),
            ShardSpec(f"{ours}.mlp_norm.weight", (f"{hf}.post_attention_layernorm.weight",), None),
            ShardSpec(f"{ours}.mlp.gate_up.weight",
                      (f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight"), 0),
            ShardSpec(f"{ours}.mlp.down.weight", (f"{hf}.mlp.down_proj.weight",), 1),
        ]
        if cfg.qkv_bias:
            specs.append(ShardSpec(f"{ours}.attn.qkv.bias",
                                   tuple(f"{attn}.{p}_proj.bias" for p in "qkv"), 0))
        if model.layer_kinds[i] == "linear":
            specs += [ShardSpec(f"{ours}.attn.gate.weight", (f"{attn}.g_proj.weight",), 0),
                      ShardSpec(f"{ours}.attn.out_norm", (f"{attn}.o_norm.weight",), 0)]
    specs.append(ShardSpec("final_norm.weight", ("model.norm.weight",), None))
    if not cfg.tie_embeddings:
        specs.append(ShardSpec("head.weight", ("lm_head.weight",), 0, padded))
    return specs


def canonical_shapes(model: LlamaModel | ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every canonical tensor the model (or a model of this config) needs, unpadded."""
    cfg = model if isinstance(model, ModelConfig) else model.cfg
    kinds = layer_kinds(cfg) if isinstance(model, ModelConfig) else model.layer_kinds
    d = cfg.head_dim or cfg.hidden_size // cfg.num_heads
    h, i_size = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h),
                                          "model.norm.weight": (h,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (cfg.num_heads * d, h),
            f"{p}.self_attn.k_proj.weight": (cfg.num_kv_heads * d, h),
            f"{p}.self_attn.v_proj.weight": (cfg.num_kv_heads * d, h),
            f"{p}.self_attn.o_proj.weight": (h, cfg.num_heads * d),
            f"{p}.mlp.gate_proj.weight": (i_size, h),
            f"{p}.mlp.up_proj.weight": (i_size, h),
            f"{p}.mlp.down_proj.weight": (h, i_size),
        })
        if cfg.qkv_bias:
            shapes[f"{p}.self_attn.q_proj.bias"] = (cfg.num_heads * d,)
            shapes[f"{p}.self_attn.k_proj.bias"] = (cfg.num_kv_heads * d,)
            shapes[f"{p}.self_attn.v_proj.bias"] = (cfg.num_kv_heads * d,)
        if kinds[i] == "linear":
            # lightning attention's output gate and per-head norm (no transformers equivalent)
            shapes[f"{p}.self_attn.g_proj.weight"] = (cfg.num_heads * d, h)
            shapes[f"{p}.self_attn.o_norm.weight"] = (cfg.num_heads * d,)
    return shapes


def _local_part(spec: ShardSpec, full: torch.Tensor, *, tp: int, tp_rank: int) -> torch.Tensor:
    if spec.dim is None:
        return full
    if spec.padded_rows is not None and full.shape[0] < spec.padded_rows:
        pad = full.new_zeros((spec.padded_rows - full.shape[0], *full.shape[1:]))
        full = torch.cat([full, pad], dim=0)
    if full.shape[spec.dim] % tp != 0:
        raise ValueError(f"{spec.pieces[0]}: dim {spec.dim} of size {full.shape[spec.dim]} "
                         f"is not divisible by parallel.tp={tp}")
    return full.chunk(tp, dim=spec.dim)[tp_rank]


@torch.no_grad()
def load_canonical(model: LlamaModel, get: Callable[[str], torch.Tensor]) -> None:
    """Fill every parameter from canonical tensors; `get(name)` returns one full tensor."""
    tp, tp_rank = model.shape.tp, model.tp_rank
    params = dict(model.named_parameters())
    shapes = canonical_shapes(model)
    for spec in shard_specs(model):
        parts = []
        for name in spec.pieces:
            full = get(name)
            if tuple(full.shape) != shapes[name]:
                raise ValueError(f"{name}: checkpoint shape {tuple(full.shape)} does not match the "
                                 f"model's {shapes[name]} (check the model config)")
            parts.append(_local_part(spec, full, tp=tp, tp_rank=tp_rank))
        local = parts[0] if len(parts) == 1 else torch.cat(parts, dim=spec.dim)
        param = params[spec.local_name]
        if param.shape != local.shape:
            raise AssertionError(f"{spec.local_name}: local shard {tuple(local.shape)} "
                                 f"vs parameter {tuple(param.shape)}")
        param.copy_(local.to(param.dtype))


def _seeded_tensor(name: str, shape: tuple[int, ...], *, seed: int, std: float) -> torch.Tensor:
    # Seeded by the canonical name, so the values do not depend on TP size or build order.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen) * std


def init_weights(model: LlamaModel, *, seed: int) -> None:
    """Seeded initialization, identical for every TP layout: normal(0, init_std) for
    projections and embeddings, output projections scaled by 1/sqrt(2 * layers), norms 1,
    biases 0."""
    cfg = model.cfg
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    shapes = canonical_shapes(model)

    def get(name: str) -> torch.Tensor:
        shape = shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        if name.endswith(".bias"):
            return torch.zeros(shape)
        std = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else cfg.init_std
        return _seeded_tensor(name, shape, seed=seed, std=std)

    load_canonical(model, get)


def _gather_dim(local: torch.Tensor, *, dim: int, tp: int, group) -> list[torch.Tensor]:
    if tp == 1:
        return [local]
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return parts


@torch.no_grad()
def iter_canonical(model: LlamaModel, *, group=None, grads: bool = False
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (canonical name, full tensor) on every TP rank (a collective: all ranks call it;
    under optim.zero=3 also over CP x DP, each parameter gathered from its shards one at a
    time).

    With `grads=True` the parameters' gradients are gathered instead (zeros where None).
    """
    tp = model.shape.tp
    params = dict(model.named_parameters())
    shapes = canonical_shapes(model)
    for spec in shard_specs(model):
        param = params[spec.local_name]
        if grads:
            local = param.grad if param.grad is not None else torch.zeros_like(param)
        else:
            local = param.detach()
        if isinstance(local, DTensor):  # sharded over CP x DP (optim.zero=3)
            local = local.full_tensor()
        if spec.dim is None:
            yield spec.pieces[0], local.clone()
            continue
        ranks = _gather_dim(local, dim=spec.dim, tp=tp, group=group)
        sizes = [shapes[name][spec.dim] for name in spec.pieces]
        if spec.padded_rows is not None:
            sizes = [spec.padded_rows]
        per_rank = [part.split([s // tp for s in sizes], dim=spec.dim) for part in ranks]
        for j, name in enumerate(spec.pieces):
            full = torch.cat([pieces[j] for pieces in per_rank], dim=spec.dim)
            yield name, full.narrow(0, 0, shapes[name][0]) if spec.padded_rows else full


def canonical_state_dict(model: LlamaModel, *, group=None, grads: bool = False
                         ) -> dict[str, torch.Tensor]:
    return dict(iter_canonical(model, group=group, grads=grads))


def gather_vocab_logits(logits_btv: torch.Tensor, *, vocab_size: int, tp: int, group=None) -> torch.Tensor:
    """Full-vocabulary logits [B, T, V] from every TP rank's shard (padding dropped)."""
    parts = _gather_dim(logits_btv, dim=-1, tp=tp, group=group)
    return torch.cat(parts, dim=-1)[..., :vocab_size]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
