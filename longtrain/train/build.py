"""Model construction, in one place for training and evaluation: the model of a config on this
rank's TP shard, with its attention plan built, its memory policy and (`train.compile`) its
decoder layers compiled, and its weights (a checkpoint's, or seeded)."""

from __future__ import annotations

import torch

from longtrain.attention.plan import model_attention
from longtrain.attention.types import AttentionContext
from longtrain.checkpoint.source import open_source_weights
from longtrain.config.schema import AttentionConfig, ModelConfig, RopeConfig, RunConfig
from longtrain.memory import store_for
from longtrain.memory.apply import apply_memory_policy
from longtrain.model.llama import LlamaModel
from longtrain.model.sharding import init_weights, load_canonical
from longtrain.parallel.runtime import ParallelRuntime

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def param_dtype(precision: str) -> torch.dtype:
    if precision not in _DTYPES:
        raise ValueError(f"train.precision={precision!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[precision]


def make_model(model: ModelConfig, rope: RopeConfig, attention: AttentionConfig, *,
               runtime: ParallelRuntime, precision: str,
               sequence_parallel: bool = False) -> LlamaModel:
    """This rank's shard of the model, weights uninitialized, each layer running the
    attention its plan gives it (`attention.plan`)."""
    softmax, linear = model_attention(attention, model)
    return LlamaModel(model, rope, attention=softmax, linear_attention=linear,
                      tp=runtime.dims.tp, tp_rank=runtime.tp_rank,
                      dtype=param_dtype(precision), device=runtime.device,
                      sequence_parallel=sequence_parallel)


def load_weights(model: LlamaModel, source: str) -> None:
    """This rank's shard of the weights of a native or Hugging Face checkpoint (`source`)."""
    with open_source_weights(source) as get:
        load_canonical(model, get)


def compile_layers(model: LlamaModel, *, backend: str = "inductor") -> None:
    """Regional compilation, as torchtitan does it: each decoder layer's forward through
    `torch.compile` (the layers share one code object, so one compilation serves them all),
    which fuses the element-wise work around the matmuls (RMSNorm, RoPE, SwiGLU, the
    residual adds). Parameter names do not change (no `_orig_mod.` prefix), so checkpoints
    are unaffected.

    Call it before `apply_memory_policy`: compilation is lazy, so the compiled forward still
    calls the policy's attention and MLP wrappers (their saved-tensor hooks break the graph
    around the core attention, which runs its own kernels), and `memory.checkpointing=full`
    then recomputes the compiled layer. Compiled after it, a fully recomputed layer is one
    reentrant checkpoint that Dynamo does not trace, and would run eagerly."""
    for layer in model.layers:
        layer.forward = torch.compile(layer.forward, backend=backend)


def build_model(cfg: RunConfig, runtime: ParallelRuntime, *, weights: bool = True,
                compile_backend: str = "inductor") -> LlamaModel:
    """This rank's model shard for training, with the memory policy (and with
    `train.compile`, each decoder layer compiled by `compile_backend`): its weights from
    `init.from` or seeded (`weights=False`: left uninitialized, for a checkpoint to fill)."""
    model = make_model(cfg.model, cfg.rope, cfg.attention, runtime=runtime,
                       precision=cfg.train.precision, sequence_parallel=cfg.sequence_parallel)
    if cfg.train.compile:
        compile_layers(model, backend=compile_backend)
    apply_memory_policy(model, store_for(cfg.memory, model.parameters(),
                                         kernels=cfg.train.kernels), cfg.memory.checkpointing)
    if not weights:
        return model
    if cfg.init_from:
        load_weights(model, cfg.init_from)
    else:
        init_weights(model, seed=cfg.train.seed)
    return model


def attention_context(runtime: ParallelRuntime, *, kernels: str = "auto") -> AttentionContext:
    """This rank's place in the CP groups and the kernels setting (`train.kernels`)."""
    return AttentionContext(cp_group=runtime.cp_group, cp_size=runtime.dims.cp,
                            cp_rank=runtime.cp_rank, ulysses_group=runtime.ulysses_group,
                            ring_group=runtime.ring_group, kernels=kernels)
