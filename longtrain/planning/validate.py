"""Pre-flight validation: every impossible setting, found before any worker starts.

`problems(cfg)` lists each violated constraint with the fields and values involved;
`validate(cfg)` raises one `ConfigError` holding all of them.
"""

from __future__ import annotations

import os

from longtrain.attention.table import TABLE, attention_names, supports_cp
from longtrain.checkpoint.export_dir import export_dir_problems
from longtrain.checkpoint.native import (CheckpointError, find_checkpoint, model_mismatch,
                                         read_manifest)
from longtrain.checkpoint.source import source_problems as checkpoint_source_problems
from longtrain.config.errors import ConfigError
from longtrain.config.pattern import layer_kinds, pattern_problems
from longtrain.config.schedule import schedule_problems, stage_config, stages
from longtrain.config.schema import RunConfig
from longtrain.data.loader import source_problems
from longtrain.data.tokenizer import load_tokenizer, tokenizer_problems
from longtrain.model.rope import rope_inv_freq
from longtrain.parallel.dims import ParallelDims
from longtrain.planning.cluster import cluster_problems

_CHOICES = {
    "train.precision": ("fp32", "bf16"),
    "train.kernels": ("auto", "triton", "torch"),
    "optim.schedule": ("cosine", "constant"),
    "optim.name": ("adamw",),
    "optim.grad_reduce_dtype": ("fp32", "param"),
    "launcher.kind": ("local", "ray"),
    "logging.wandb.mode": ("online", "offline", "disabled"),
    "parallel.backend": ("auto", "gloo", "nccl"),
    "model.linear_feature_map": ("silu", "elu1", "identity"),
    "model.linear_decay": ("slopes", "slopes_by_layer", "none"),
    "memory.activations": ("none", "int8"),
    "memory.checkpointing": ("none", "selective", "full"),
}
# unset: resolved later (W&B's environment, then a default: longtrain.observability.wandb_run)
_UNSET_OK = {"logging.wandb.mode"}


def _get(cfg: RunConfig, dotted: str) -> object:
    obj: object = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _memory_problems(cfg: RunConfig) -> list[str]:
    mem = cfg.memory
    out: list[str] = []
    g = mem.group_size
    if g < 16 or g > 4096 or g & (g - 1):
        out.append(f"memory.group_size={g} must be a power of two in [16, 4096]")
    if mem.budget_gib is not None and mem.budget_gib <= 0:
        out.append(f"memory.budget_gib={mem.budget_gib} must be > 0")
    return out


def _model_problems(cfg: RunConfig) -> list[str]:
    m, tp = cfg.model, cfg.parallel.tp
    out: list[str] = []
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads"):
        if getattr(m, name) < 1:
            out.append(f"model.{name}={getattr(m, name)} must be >= 1")
    if out:
        return out
    if m.num_heads % m.num_kv_heads != 0:
        out.append(f"model.num_heads={m.num_heads} is not divisible by "
                   f"model.num_kv_heads={m.num_kv_heads} (GQA groups must be equal)")
    if tp >= 1:
        if m.num_heads % tp != 0:
            out.append(f"model.num_heads={m.num_heads} is not divisible by parallel.tp={tp}")
        if m.num_kv_heads % tp != 0:
            out.append(f"model.num_kv_heads={m.num_kv_heads} is not divisible by parallel.tp={tp}")
        if m.intermediate_size % tp != 0:
            out.append(f"model.intermediate_size={m.intermediate_size} is not divisible by "
                       f"parallel.tp={tp}")
    if m.head_dim is None and m.hidden_size % m.num_heads != 0:
        out.append(f"model.hidden_size={m.hidden_size} is not divisible by "
                   f"model.num_heads={m.num_heads}; set model.head_dim")
    head_dim = m.head_dim or m.hidden_size // m.num_heads
    if head_dim % 2 != 0:
        out.append(f"model head dim {head_dim} must be even for RoPE (model.head_dim)")
    return out


def _layer_problems(cfg: RunConfig) -> list[str]:
    """The layer pattern, then the backend's own problems (its spec's `problems`): for a
    hybrid / linear-attention model, which method runs which layer."""
    m, a = cfg.model, cfg.attention
    out = pattern_problems(m.layer_pattern)
    spec = TABLE.get(a.backend)
    linear = spec is not None and spec.kind == "linear"
    if not out and not linear and "linear" in layer_kinds(m):
        out.append(f"model.layer_pattern={m.layer_pattern!r} has linear-attention layers: "
                   f"choose their sequence-parallel method with attention=lasp1 or "
                   f"attention=lasp2 (attention.backend is {a.backend!r})")
    return out + (spec.problems(cfg) if spec is not None else [])


def _rope_problems(cfg: RunConfig) -> list[str]:
    m = cfg.model
    head_dim = m.head_dim or max(1, m.hidden_size // max(1, m.num_heads))
    if head_dim < 2 or head_dim % 2:
        # _model_problems already reports a bad head dim; still check the rope fields themselves.
        head_dim = 64
    try:
        rope_inv_freq(cfg.rope, head_dim=head_dim, max_position_embeddings=m.max_position_embeddings,
                      seq_len=cfg.data.seq_len)
    except ValueError as exc:
        return [str(exc)]
    return []


def _data_problems(cfg: RunConfig, dims: ParallelDims) -> list[str]:
    d, cp, tp = cfg.data, cfg.parallel.cp, cfg.parallel.tp
    out = source_problems(d)
    if not tokenizer_problems(d.tokenizer):
        try:
            vocab = load_tokenizer(d.tokenizer).vocab_size
        except ValueError as exc:
            if str(exc) not in out:
                out.append(str(exc))
        else:
            if cfg.model.vocab_size < vocab:
                out.append(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                           f"{vocab} ids of data.tokenizer={d.tokenizer!r}")
    if d.seq_len < 1:
        out.append(f"data.seq_len={d.seq_len} must be >= 1")
    elif cp >= 1 and d.seq_len % (2 * cp) != 0:
        out.append(f"data.seq_len={d.seq_len} is not divisible by 2 * parallel.cp = {2 * cp} "
                   f"(the zigzag layout cuts the sequence into 2*cp chunks)")
    elif cp >= 1 and cfg.sequence_parallel and (d.seq_len // cp) % tp:
        out.append(f"data.seq_len={d.seq_len} / parallel.cp={cp} = {d.seq_len // cp} local "
                   f"tokens is not divisible by parallel.tp={tp} (sequence parallelism splits "
                   f"them over the TP ranks; or set parallel.sequence_parallel=false)")
    if d.micro_batch_size < 1 or d.batch_size < 1:
        out.append(f"data.batch_size={d.batch_size} and data.micro_batch_size="
                   f"{d.micro_batch_size} must be >= 1")
    elif not dims.problems() and d.batch_size % (dims.dp * d.micro_batch_size) != 0:
        out.append(f"data.batch_size={d.batch_size} is not divisible by data parallel size "
                   f"{dims.dp} (parallel.world_size / (tp * cp)) * data.micro_batch_size="
                   f"{d.micro_batch_size}")
    return out


def problems(cfg: RunConfig) -> list[str]:
    dims = ParallelDims.from_config(cfg.parallel)
    out = dims.problems()
    out += _model_problems(cfg)
    for field, allowed in _CHOICES.items():
        value = _get(cfg, field)
        if value is None and field in _UNSET_OK:
            continue
        if value not in allowed:
            out.append(f"{field}={value!r} is not one of {list(allowed)}")
    backend = cfg.attention.backend
    if backend not in attention_names():
        out.append(f"attention.backend={backend!r} is not one of {attention_names()}")
    elif cfg.parallel.cp > 1 and not supports_cp(backend):
        out.append(f"attention.backend={backend!r} does not support context parallelism "
                   f"(parallel.cp={cfg.parallel.cp}); use parallel.cp=1")
    out += _layer_problems(cfg)
    out += _memory_problems(cfg)
    # Always checked: a model problem (say num_heads vs tp) must not hide a bad rope setting.
    out += _rope_problems(cfg)
    out += _data_problems(cfg, dims)
    if cfg.train.steps < 1:
        out.append(f"train.steps={cfg.train.steps} must be >= 1")
    if not isinstance(cfg.train.compile, bool):
        out.append(f"train.compile={cfg.train.compile!r} must be true or false")
    if not isinstance(cfg.train.loss_chunk, int) or cfg.train.loss_chunk < 0:
        out.append(f"train.loss_chunk={cfg.train.loss_chunk!r} must be an integer >= 0 "
                   f"(positions per loss chunk; 0: the whole sequence at once)")
    if cfg.optim.lr <= 0:
        out.append(f"optim.lr={cfg.optim.lr} must be > 0")
    if cfg.sequence_parallel and cfg.optim.zero in (1, 2):
        out.append(f"parallel.sequence_parallel=true with optim.zero={cfg.optim.zero}: "
                   f"DeepSpeed does not sum the norms' gradients over TP; use "
                   f"parallel.sequence_parallel=false (the default with ZeRO-1/2), "
                   f"optim.zero=0 or optim.zero=3")
    if not cfg.optim.grad_bucket_mb > 0:
        out.append(f"optim.grad_bucket_mb={cfg.optim.grad_bucket_mb} must be > 0")
    if cfg.optim.warmup_steps < 0:
        out.append(f"optim.warmup_steps={cfg.optim.warmup_steps} must be >= 0")
    if cfg.optim.zero not in (0, 1, 2, 3):
        out.append(f"optim.zero={cfg.optim.zero!r} is not one of [0, 1, 2, 3] (0 no sharding, "
                   f"1 AdamW state, 2 and gradients, 3 and parameters)")
    elif cfg.optim.zero and len({dict(st).get("cp", cfg.parallel.cp)
                                 for st in cfg.train.schedule} | {cfg.parallel.cp}) > 1:
        out.append(f"optim.zero={cfg.optim.zero} with a train.schedule that changes the CP "
                   f"degree: the ZeRO shards are laid out over CP x DP; keep cp fixed or use "
                   f"optim.zero=0")
    if cfg.attention.check_every < 0:
        out.append(f"attention.check_every={cfg.attention.check_every} must be >= 0 (0 disables)")
    if cfg.attention.check_tol is not None and cfg.attention.check_tol <= 0:
        out.append(f"attention.check_tol={cfg.attention.check_tol} must be > 0")
    if cfg.launcher.max_restarts < 0:
        out.append(f"launcher.max_restarts={cfg.launcher.max_restarts} must be >= 0")
    if cfg.parallel.timeout_s < 1:
        out.append(f"parallel.timeout_s={cfg.parallel.timeout_s} must be >= 1")
    if cfg.logging.every < 1:
        out.append(f"logging.every={cfg.logging.every} must be >= 1")
    if cfg.logging.peak_tflops is not None and not cfg.logging.peak_tflops > 0:
        out.append(f"logging.peak_tflops={cfg.logging.peak_tflops} must be > 0 (or null: "
                   f"measured at start)")
    unknown_init = sorted(set(cfg.init) - {"from", "required"})
    if unknown_init:
        out.append(f"init.{unknown_init[0]} is not a known field (init has: from, required)")
    if cfg.init.get("required") and cfg.init_from is None:
        out.append("init.from is not set, but this experiment starts from a checkpoint "
                   "(init.required=true): pass init.from=<Hugging Face model dir or longtrain checkpoint>")
    if cfg.init_from is not None:
        out += checkpoint_source_problems(str(cfg.init_from), field="init.from")
    out += _checkpoint_problems(cfg)
    out += _schedule_problems(cfg, out)

    out += cluster_problems(cfg)
    return out


def _checkpoint_problems(cfg: RunConfig) -> list[str]:
    c = cfg.checkpoint
    out = []
    if c.every < 0:
        out.append(f"checkpoint.every={c.every} must be >= 0 (0: only the final step)")
    if c.keep < 1:
        out.append(f"checkpoint.keep={c.keep} must be >= 1")
    if c.resume not in ("auto", "never"):
        try:
            manifest = read_manifest(find_checkpoint(c.resume))
            if manifest.get("weights_only"):
                out.append(f"checkpoint.resume={c.resume!r} holds weights only (no optimizer "
                           f"state or data position): start from it with init.from instead")
            diffs = model_mismatch(manifest, cfg.model)
            if diffs:
                out.append(f"checkpoint.resume={c.resume!r} was saved from another model: "
                           + "; ".join(diffs))
        except CheckpointError as exc:
            out.append(f"checkpoint.resume: {exc}")
    if cfg.train.save_hf:
        hf_dir = os.path.join(cfg.output_dir, "hf")
        # found now rather than when the export runs, after the whole training
        for found in export_dir_problems(hf_dir, field="<output_dir>/hf"):
            out.append(f"train.save_hf=true: {found.split('; ')[0]}; move those files, "
                       f"choose another output_dir, or set train.save_hf=false")
    return out


def _schedule_problems(cfg: RunConfig, found: list[str]) -> list[str]:
    """Each stage's own layout and data shape (CP degree, seq_len vs 2*cp, batch vs dp),
    reported once per stage and only where they add to what the run itself already broke."""
    out = schedule_problems(cfg)
    if out or not cfg.train.schedule:
        return out
    for stage in stages(cfg):
        scfg = stage_config(cfg, stage)
        dims = ParallelDims.from_config(scfg.parallel)
        stage_found = dims.problems() + _data_problems(scfg, dims)

        if stage.cp > 1 and not supports_cp(cfg.attention.backend):
            stage_found.append(f"attention.backend={cfg.attention.backend!r} does not support "
                               f"context parallelism (cp={stage.cp})")
        out += [f"train.schedule[{stage.index}]: {p}" for p in stage_found if p not in found]
    return out


def validate(cfg: RunConfig) -> ParallelDims:
    """Raise ConfigError naming every problem; return the validated parallel dims."""
    found = problems(cfg)
    if found:
        raise ConfigError(found)
    return ParallelDims.from_config(cfg.parallel)
