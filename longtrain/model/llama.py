"""Llama-family decoder on megatron-core tensor-parallel layers.

Legend: B batch, T local sequence length, H hidden size, Hq/Hkv query/key-value heads on
this TP rank, D head dim, V/tp this rank's vocabulary shard.

The model is a plain `nn.Module` holding only this TP rank's shards. Parameters are named by
our modules; `longtrain.model.sharding` maps them to and from the canonical (Hugging Face
Llama) names, which is how weights are initialized, imported and exported, so a model built at
any TP size computes the same function.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from longtrain.attention.linear import head_log_decay
from longtrain.attention.linear import linear_attention as by_name
from longtrain.attention.types import AttentionContext, AttentionFn, AttentionMeta
from longtrain.config.pattern import layer_kinds
from longtrain.config.schema import ModelConfig, RopeConfig
from longtrain.memory.functions import rms_norm, swiglu, swiglu_down
from longtrain.model.rope import RotaryEmbedding, apply_rotary, query_scale
from longtrain.parallel import sequence

FEATURE_MAPS = {"silu": F.silu, "elu1": lambda x: F.elu(x) + 1.0, "identity": lambda x: x}


@dataclass(frozen=True)
class ModelShape:
    """Derived sizes of a model at a given TP degree."""

    cfg: ModelConfig
    tp: int

    @property
    def head_dim(self) -> int:
        return self.cfg.head_dim or self.cfg.hidden_size // self.cfg.num_heads

    @property
    def padded_vocab_size(self) -> int:
        # Each TP rank holds an equal vocabulary shard; the padding rows are masked out.
        return -(-self.cfg.vocab_size // self.tp) * self.tp

    @property
    def local_heads(self) -> int:
        return self.cfg.num_heads // self.tp

    @property
    def local_kv_heads(self) -> int:
        return self.cfg.num_kv_heads // self.tp


def megatron_parallel_config(*, tp: int, params_dtype: torch.dtype, on_cpu: bool):
    from megatron.core.model_parallel_config import ModelParallelConfig

    # Weights are written by longtrain.model.sharding (same values at every TP size), so
    # megatron's own initialization is skipped.
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=on_cpu,
        perform_initialization=False,
        params_dtype=params_dtype,
    )


def _skip_init(_: torch.Tensor) -> None:
    return None


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _column(layer: nn.Module, x_bth: torch.Tensor, sp: bool) -> torch.Tensor:
    """A megatron column-parallel linear; under sequence parallelism (`sp`) its input is this
    rank's T / tp tokens, all-gathered for the product (and again in the backward:
    `longtrain.parallel.sequence.gather_linear`)."""
    if not sp:
        return layer(x_bth)[0]
    return sequence.gather_linear(x_bth, layer.weight, layer.bias, _tp_group())


def _summed(partial_bth: torch.Tensor, sp: bool) -> torch.Tensor:
    """A row-parallel product's partial sums over the TP ranks: all-reduced, or under sequence
    parallelism reduce-scattered along the sequence."""
    if sp:
        return sequence.reduce_scatter(partial_bth, _tp_group())
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(partial_bth)


def _row(layer: nn.Module, x_bth: torch.Tensor, sp: bool) -> torch.Tensor:
    """A megatron row-parallel linear (no bias): megatron's own call, or under sequence
    parallelism its product `_summed` along the sequence."""
    if not sp:
        return layer(x_bth)[0]
    return _summed(F.linear(x_bth, layer.weight), sp)


def mark_sequence_parallel(model: nn.Module) -> None:
    """Tag the parameters that see only this TP rank's share of the sequence under sequence
    parallelism (the RMSNorm weights): their gradients are summed over the TP group
    (`sequence_parallel` attribute, as megatron-core names it)."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.sequence_parallel = True


def _mark_tensor_parallel(model: nn.Module) -> None:
    """Tag every TP-sharded weight the way megatron does (`tensor_model_parallel`,
    `partition_dim`): megatron sets the tags only inside its own initialization, which
    `perform_initialization=False` skips, and the gradient norm needs them to sum the shards
    over the TP group."""
    from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                               VocabParallelEmbedding,
                                               set_tensor_model_parallel_attributes)

    partition_dim = {ColumnParallelLinear: 0, VocabParallelEmbedding: 0, RowParallelLinear: 1}
    for module in model.modules():
        dim = partition_dim.get(type(module))
        weight = getattr(module, "weight", None)
        if dim is not None and weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (as transformers' LlamaRMSNorm)."""

    def __init__(self, size: int, *, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device))

    def forward(self, x_bth: torch.Tensor) -> torch.Tensor:
        return rms_norm(x_bth, self.weight, self.eps)


def _attention_projections(shape: ModelShape, mp_config) -> tuple[nn.Module, nn.Module]:
    """(fused q|k|v, output projection): each TP rank's qkv output rows are
    [q_local, k_local, v_local]."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    cfg, d = shape.cfg, shape.head_dim
    qkv = ColumnParallelLinear(
        cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * d, config=mp_config,
        init_method=_skip_init, bias=cfg.qkv_bias, gather_output=False,
    )
    out = RowParallelLinear(
        cfg.num_heads * d, cfg.hidden_size, config=mp_config, init_method=_skip_init,
        bias=False, input_is_parallel=True, skip_bias_add=False,
    )
    return qkv, out


def _heads(qkv_btx: torch.Tensor, s: ModelShape) -> tuple[torch.Tensor, ...]:
    """The fused projection's output -> q [B, T, Hq, D], k and v [B, T, Hkv, D] (views)."""
    b, t, _ = qkv_btx.shape
    d = s.head_dim
    q, k, v = qkv_btx.split([s.local_heads * d, s.local_kv_heads * d, s.local_kv_heads * d],
                            dim=-1)
    return (q.view(b, t, s.local_heads, d), k.view(b, t, s.local_kv_heads, d),
            v.view(b, t, s.local_kv_heads, d))


class Attention(nn.Module):
    # set by LlamaModel under sequence parallelism (its input holds T / tp tokens)
    sp = False

    def __init__(self, shape: ModelShape, *, mp_config, attention: AttentionFn,
                 tp_rank: int = 0) -> None:
        super().__init__()
        self.shape = shape
        self.attention = attention
        # this rank's first global head (head-dependent patterns: s2)
        self.head_offset = tp_rank * shape.local_heads
        self.qkv, self.out = _attention_projections(shape, mp_config)

    def forward(self, x_bth: torch.Tensor, cos_btd: torch.Tensor, sin_btd: torch.Tensor,
                meta: AttentionMeta, ctx: AttentionContext, *,
                q_scale_bt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q_scale_bt: float32 [B, T] factor on the rotated queries (None: unscaled). Under
        sequence parallelism x holds T / tp tokens; q, k, v and the output projection's input
        the whole T."""
        s = self.shape
        d = s.head_dim
        q, k, v_bthd = _heads(_column(self.qkv, x_bth, self.sp), s)
        b, t = q.shape[:2]
        q_bthd = apply_rotary(q, cos_btd, sin_btd, scale_bt=q_scale_bt)
        k_bthd = apply_rotary(k, cos_btd, sin_btd)
        if self.head_offset:
            meta = dataclasses.replace(meta, head_offset=self.head_offset)
        o_bthd = self.attention(q_bthd, k_bthd, v_bthd, meta, ctx)
        return _row(self.out, o_bthd.reshape(b, t, s.local_heads * d), self.sp)


class LinearAttention(nn.Module):
    """Lightning attention (TransNormerLLM): o = out(norm_h(lin_attn(phi(q), phi(k), v)) *
    sigmoid(gate(x))), with a fixed per-head decay on the *global* head index (so every TP
    layout computes the same function), a per-head RMS norm (no TP reduction) and no RoPE:
    position enters through the decay. `linear_attention` is the sequence-parallel method."""

    # set by LlamaModel under sequence parallelism (its input holds T / tp tokens)
    sp = False

    def __init__(self, shape: ModelShape, *, mp_config, linear_attention, tp_rank: int,
                 dtype: torch.dtype, device: torch.device, layer: int = 0) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import (ColumnParallelLinear,
                                                   set_tensor_model_parallel_attributes)

        cfg = shape.cfg
        self.shape = shape
        self.linear_attention = linear_attention
        self.feature_map = FEATURE_MAPS[cfg.linear_feature_map]
        d = shape.head_dim
        self.qkv, self.out = _attention_projections(shape, mp_config)
        self.gate = ColumnParallelLinear(cfg.hidden_size, cfg.num_heads * d, config=mp_config,
                                         init_method=_skip_init, bias=False, gather_output=False)
        self.out_norm = nn.Parameter(torch.ones(shape.local_heads * d, dtype=dtype, device=device))
        set_tensor_model_parallel_attributes(self.out_norm, is_parallel=True, dim=0, stride=1)
        first = tp_rank * shape.local_heads
        decay = head_log_decay(cfg.num_heads, cfg.linear_decay, layer=layer,
                               num_layers=cfg.num_layers)[first:first + shape.local_heads]
        self.register_buffer("log_decay", decay.to(device), persistent=False)

    def forward(self, x_bth: torch.Tensor, cos_btd: torch.Tensor, sin_btd: torch.Tensor,
                meta: AttentionMeta, ctx: AttentionContext, *,
                q_scale_bt: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = self.shape
        q, k, v = _heads(_column(self.qkv, x_bth, self.sp), s)
        b, t = q.shape[:2]
        group = s.local_heads // s.local_kv_heads
        q_bthd = self.feature_map(q) * s.head_dim ** -0.5
        k_bthd = self.feature_map(k).repeat_interleave(group, 2)
        v_bthd = v.repeat_interleave(group, 2)
        o_bthd = self.linear_attention(q_bthd, k_bthd, v_bthd, self.log_decay, meta, ctx)
        o32 = o_bthd.float()
        o32 = o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + s.cfg.norm_eps)
        gate = _column(self.gate, x_bth, self.sp)
        o = (o32.to(x_bth.dtype).reshape(b, t, -1) * self.out_norm) * torch.sigmoid(gate)
        return _row(self.out, o, self.sp)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused per TP rank."""

    # set by LlamaModel under sequence parallelism (its input holds T / tp tokens)
    sp = False
    # memory.checkpointing=selective: the SwiGLU product is recomputed for the down
    # projection's weight gradient instead of kept (`memory.functions.swiglu_down`)
    recompute_product = False

    def __init__(self, shape: ModelShape, *, mp_config) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        cfg = shape.cfg
        self.gate_up = ColumnParallelLinear(
            cfg.hidden_size, 2 * cfg.intermediate_size, config=mp_config, init_method=_skip_init,
            bias=False, gather_output=False,
        )
        self.down = RowParallelLinear(
            cfg.intermediate_size, cfg.hidden_size, config=mp_config, init_method=_skip_init,
            bias=False, input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, x_bth: torch.Tensor) -> torch.Tensor:
        gate, up = _column(self.gate_up, x_bth, self.sp).chunk(2, dim=-1)
        if not self.recompute_product:
            return _row(self.down, swiglu(gate, up), self.sp)
        return _summed(swiglu_down(gate, up, self.down.weight), self.sp)


class DecoderLayer(nn.Module):
    def __init__(self, shape: ModelShape, *, mp_config, attention: AttentionFn,
                 dtype: torch.dtype, device: torch.device, kind: str = "softmax",
                 linear_attention=None, tp_rank: int = 0, layer: int = 0) -> None:
        super().__init__()
        cfg = shape.cfg
        self.kind = kind
        self.attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype, device=device)
        self.attn: nn.Module
        if kind == "linear":
            self.attn = LinearAttention(shape, mp_config=mp_config,
                                        linear_attention=linear_attention, tp_rank=tp_rank,
                                        dtype=dtype, device=device, layer=layer)
        else:
            self.attn = Attention(shape, mp_config=mp_config, attention=attention,
                                  tp_rank=tp_rank)
        self.mlp_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype, device=device)
        self.mlp = MLP(shape, mp_config=mp_config)

    def forward(self, x_bth: torch.Tensor, cos_btd: torch.Tensor, sin_btd: torch.Tensor,
                meta: AttentionMeta, ctx: AttentionContext, *,
                q_scale_bt: Optional[torch.Tensor] = None) -> torch.Tensor:
        x_bth = x_bth + self.attn(self.attn_norm(x_bth), cos_btd, sin_btd, meta, ctx,
                                  q_scale_bt=q_scale_bt)
        return x_bth + self.mlp(self.mlp_norm(x_bth))


class LlamaModel(nn.Module):
    """Decoder returning this TP rank's vocabulary shard of the logits.

    Build it inside an initialized megatron-core parallel_state (TP group); weights are
    uninitialized until `longtrain.model.sharding.init_weights` or `load_canonical` runs.
    """

    def __init__(self, cfg: ModelConfig, rope: RopeConfig, *, attention: AttentionFn, tp: int,
                 tp_rank: int, dtype: torch.dtype = torch.float32,
                 device: torch.device = torch.device("cpu"), linear_attention=None,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding

        self.cfg = cfg
        self.shape = ModelShape(cfg, tp)
        self.tp_rank = tp_rank
        mp_config = megatron_parallel_config(tp=tp, params_dtype=dtype, on_cpu=device.type == "cpu")
        # Megatron sequence parallelism: between the parallel linears (norms, residuals)
        # each TP rank holds T / tp of the local tokens
        self.sequence_parallel = sequence_parallel and tp > 1
        self.embed = VocabParallelEmbedding(self.shape.padded_vocab_size, cfg.hidden_size,
                                            init_method=_skip_init, config=mp_config)
        # linear layers (model.layer_pattern) use `linear_attention`, LASP-2 when not given
        # (at cp=1 every method is the plain lightning attention)
        self.layer_kinds = layer_kinds(cfg, linear_default=linear_attention is not None)
        if linear_attention is None and "linear" in self.layer_kinds:
            linear_attention = by_name("lasp2")
        # one softmax backend for every layer, or one per layer (s2 keeps some layers dense)
        per_layer = attention if isinstance(attention, (list, tuple)) else \
            [attention] * cfg.num_layers
        self.layers = nn.ModuleList(
            DecoderLayer(self.shape, mp_config=mp_config, attention=fn, dtype=dtype,
                         device=device, kind=kind, linear_attention=linear_attention,
                         tp_rank=tp_rank, layer=i)
            for i, (kind, fn) in enumerate(zip(self.layer_kinds, per_layer))
        )
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype, device=device)
        # the head reads the gathered sequence (the chunked loss cuts it into chunks)
        self.head = ColumnParallelLinear(
            cfg.hidden_size, self.shape.padded_vocab_size, config=mp_config, init_method=_skip_init,
            bias=False, gather_output=False, skip_weight_param_allocation=cfg.tie_embeddings,
        )
        self.rotary = RotaryEmbedding(rope, head_dim=self.shape.head_dim,
                                      max_position_embeddings=cfg.max_position_embeddings).to(device)
        local_vocab = self.shape.padded_vocab_size // tp
        valid = cfg.vocab_size - tp_rank * local_vocab
        # Logit columns past the true vocabulary (TP padding) are masked to -inf.
        self._num_padded_logits = max(0, local_vocab - max(valid, 0))
        _mark_tensor_parallel(self)
        if self.sequence_parallel:
            mark_sequence_parallel(self)
            for module in self.modules():
                if isinstance(module, (Attention, LinearAttention, MLP)):
                    module.sp = True

    def forward(self, tokens_bt: torch.Tensor, *, positions_bt: Optional[torch.Tensor] = None,
                doc_ids_bt: Optional[torch.Tensor] = None, seq_len: Optional[int] = None,
                ctx: AttentionContext = AttentionContext(), head: bool = True) -> torch.Tensor:
        """tokens [B, T] int64 -> logits [B, T, V/tp] (this rank's vocab shard, param dtype);
        with head=False the final-norm outputs [B, T, H] instead (for `chunked_loss_sum`).

        positions: true global positions of the local tokens (default 0..T-1); seq_len: the
        global sequence length (dynamic RoPE scaling uses it).
        """
        if positions_bt is None:
            positions_bt = torch.arange(tokens_bt.shape[1], device=tokens_bt.device).expand_as(tokens_bt)
        rope = self.rotary.rope
        cos_btd, sin_btd = self.rotary(positions_bt, seq_len=seq_len)
        # entropy_abf scales the queries of layers >= rope.entropy_unscaled_layers; every other
        # scaling gets None.
        q_scale_bt = query_scale(rope, positions_bt,
                                 max_position_embeddings=self.cfg.max_position_embeddings)
        meta = AttentionMeta(causal=True, positions_bt=positions_bt, doc_ids_bt=doc_ids_bt)
        x_bth = self.embed(tokens_bt)
        if self.sequence_parallel:
            x_bth = sequence.scatter(x_bth, _tp_group())
        for i, layer in enumerate(self.layers):
            scaled = q_scale_bt is not None and i >= rope.entropy_unscaled_layers
            x_bth = layer(x_bth, cos_btd=cos_btd, sin_btd=sin_btd, meta=meta, ctx=ctx,
                          q_scale_bt=q_scale_bt if scaled else None)
        x_bth = self.final_norm(x_bth)
        if self.sequence_parallel:
            # the head sums its input gradient over TP itself: the backward only splits
            x_bth = sequence.gather_summed_grad(x_bth, _tp_group())
        return self.logits(x_bth) if head else x_bth

    def logits(self, x_bth: torch.Tensor) -> torch.Tensor:
        """The LM head on final-norm outputs [B, T, H] -> this rank's vocabulary shard of the
        logits [B, T, V/tp], the TP padding columns at -inf (the chunked loss calls it one
        chunk of positions at a time)."""
        weight = self.embed.weight if self.cfg.tie_embeddings else None
        logits, _ = self.head(x_bth, weight=weight)
        if self._num_padded_logits:
            logits = logits.clone()
            logits[..., -self._num_padded_logits:] = float("-inf")
        return logits
