"""Llama-family decoder on megatron-core tensor-parallel layers.

Legend: B batch, T local sequence length, H hidden size, Hq/Hkv query/key-value heads on
this TP rank, D head dim, V/tp this rank's vocabulary shard.

The model is a plain `nn.Module` holding only this TP rank's shards. Parameters are named by
our modules; `longtrain.model.sharding` maps them to and from the canonical (Hugging Face
Llama) names, which is how weights are initialized, imported and exported, so a model built at
any TP size computes the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from longtrain.attention.base import AttentionContext, AttentionFn, AttentionMeta
from longtrain.config.schema import ModelConfig, RopeConfig
from longtrain.model.rope import RotaryEmbedding, apply_rotary, query_scale


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
        x32 = x_bth.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x_bth.dtype)


class Attention(nn.Module):
    def __init__(self, shape: ModelShape, *, mp_config, attention: AttentionFn) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        cfg = shape.cfg
        self.shape = shape
        self.attention = attention
        # Parity canary (attention.check_every): armed for one call by `arm_parity_check`.
        self.parity_tol: Optional[float] = None
        self.parity_armed = False
        self.last_parity_error: Optional[float] = None
        d = shape.head_dim
        # Fused q|k|v: each TP rank's output rows are [q_local, k_local, v_local].
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * d, config=mp_config,
            init_method=_skip_init, bias=cfg.qkv_bias, gather_output=False,
        )
        self.out = RowParallelLinear(
            cfg.num_heads * d, cfg.hidden_size, config=mp_config, init_method=_skip_init,
            bias=False, input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, x_bth: torch.Tensor, cos_btd: torch.Tensor, sin_btd: torch.Tensor,
                meta: AttentionMeta, ctx: AttentionContext, *,
                q_scale_bt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q_scale_bt: float32 [B, T] factor on the rotated queries (None: unscaled)."""
        b, t, _ = x_bth.shape
        s = self.shape
        d = s.head_dim
        qkv, _ = self.qkv(x_bth)
        q, k, v = qkv.split([s.local_heads * d, s.local_kv_heads * d, s.local_kv_heads * d], dim=-1)
        q_bthd = apply_rotary(q.view(b, t, s.local_heads, d), cos_btd, sin_btd, scale_bt=q_scale_bt)
        k_bthd = apply_rotary(k.view(b, t, s.local_kv_heads, d), cos_btd, sin_btd)
        v_bthd = v.view(b, t, s.local_kv_heads, d)
        o_bthd = self.attention(q_bthd, k_bthd, v_bthd, meta, ctx)
        if self.parity_armed:
            from longtrain.attention.canary import check_parity

            self.parity_armed = False
            self.last_parity_error = check_parity(
                q_bthd, k_bthd, v_bthd, o_bthd, meta, ctx, tol=self.parity_tol,
                backend=getattr(self.attention, "__name__", str(self.attention)),
                where="layer 0")
        out, _ = self.out(o_bthd.reshape(b, t, s.local_heads * d))
        return out


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused per TP rank."""

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
        gate_up, _ = self.gate_up(x_bth)
        gate, up = gate_up.chunk(2, dim=-1)
        out, _ = self.down(F.silu(gate) * up)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, shape: ModelShape, *, mp_config, attention: AttentionFn,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        cfg = shape.cfg
        self.attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype, device=device)
        self.attn = Attention(shape, mp_config=mp_config, attention=attention)
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
                 device: torch.device = torch.device("cpu")) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding

        self.cfg = cfg
        self.shape = ModelShape(cfg, tp)
        self.tp_rank = tp_rank
        mp_config = megatron_parallel_config(tp=tp, params_dtype=dtype, on_cpu=device.type == "cpu")
        self.embed = VocabParallelEmbedding(self.shape.padded_vocab_size, cfg.hidden_size,
                                            init_method=_skip_init, config=mp_config)
        self.layers = nn.ModuleList(
            DecoderLayer(self.shape, mp_config=mp_config, attention=attention, dtype=dtype,
                         device=device)
            for _ in range(cfg.num_layers)
        )
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype, device=device)
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

    def arm_parity_check(self, *, tol: Optional[float]) -> None:
        """Compare layer 0's next attention call with dense attention (see attention.canary)."""
        attn = self.layers[0].attn
        attn.parity_armed, attn.parity_tol, attn.last_parity_error = True, tol, None

    def forward(self, tokens_bt: torch.Tensor, *, positions_bt: Optional[torch.Tensor] = None,
                doc_ids_bt: Optional[torch.Tensor] = None, seq_len: Optional[int] = None,
                ctx: AttentionContext = AttentionContext()) -> torch.Tensor:
        """tokens [B, T] int64 -> logits [B, T, V/tp] (this rank's vocab shard, param dtype).

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
        for i, layer in enumerate(self.layers):
            scaled = q_scale_bt is not None and i >= rope.entropy_unscaled_layers
            x_bth = layer(x_bth, cos_btd, sin_btd, meta, ctx, q_scale_bt=q_scale_bt if scaled else None)
        x_bth = self.final_norm(x_bth)
        weight = self.embed.weight if self.cfg.tie_embeddings else None
        logits, _ = self.head(x_bth, weight=weight)
        if self._num_padded_logits:
            logits = logits.clone()
            logits[..., -self._num_padded_logits:] = float("-inf")
        return logits
