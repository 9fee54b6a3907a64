"""Config resolution, before validation: what a run's config means once its checkpoint, its
schedule and its layer pattern are read (`resolve`). `memory=auto` is longtrain.planning.memory;
`checkpoint.resume` is resolved by the entry point, once (`checkpoint.native.choose_resume`)."""

from __future__ import annotations

import dataclasses

from longtrain.attention.plan import is_linear_backend
from longtrain.checkpoint.source import read_model_source, source_tokenizer
from longtrain.config.pattern import layer_kinds, pattern_problems
from longtrain.config.schedule import apply_schedule, stages
from longtrain.config.schema import RopeConfig, RunConfig
from longtrain.data.tokenizer import AUTO, BYTE
from longtrain.observability.log import get_logger


def resolve(cfg: RunConfig) -> RunConfig:
    """The schedule's first stage, then `init.from`'s model, RoPE and tokenizer, then the
    layer kinds made explicit: the config every later step (validation, --check, the
    workers) reads."""
    return apply_layer_pattern(apply_init_from(apply_schedule(cfg)))


def apply_layer_pattern(cfg: RunConfig) -> RunConfig:
    """Make the layer kinds explicit in the config a run saves with its checkpoints: with
    attention=lasp1|lasp2 and no pattern every layer is linear ("L"). A model with linear
    layers has no Hugging Face equivalent, so `train.save_hf` is turned off (said once)."""
    if not pattern_problems(cfg.model.layer_pattern) and not cfg.model.layer_pattern \
            and is_linear_backend(cfg.attention.backend):
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, layer_pattern="L"))
    if cfg.train.save_hf and not pattern_problems(cfg.model.layer_pattern) \
            and "linear" in layer_kinds(cfg.model):
        get_logger().warning("model.layer_pattern=%r has linear-attention layers, which "
                             "transformers cannot load: no Hugging Face export at the end (the "
                             "native checkpoint has the weights)", cfg.model.layer_pattern)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, save_hf=False))
    return cfg


_ROPE_SCALING_FIELDS = tuple(f.name for f in dataclasses.fields(RopeConfig) if f.name != "theta")


def apply_init_from(cfg: RunConfig) -> RunConfig:
    """The run config to use when `init.from` (a Hugging Face directory or a native
    checkpoint) is set (driver side, before workers start).

    `model` is entirely the checkpoint's. RoPE is the checkpoint's, except that a scaling the
    user asked for (`rope.scaling` other than "none") replaces the checkpoint's scaling
    fields, and for `abf` and `entropy_abf` (whose point is the larger base) the user's theta
    replaces the checkpoint's theta. `data.tokenizer=auto` becomes the checkpoint's tokenizer
    (`source_tokenizer`), or "byte" when it has none. Returns `cfg` itself when `init.from`
    is unset.
    """
    if not cfg.init_from:
        return cfg
    path = str(cfg.init_from)
    model, ckpt_rope = read_model_source(path)
    data = cfg.data
    if data.tokenizer == AUTO:
        data = dataclasses.replace(data, tokenizer=source_tokenizer(path) or BYTE)
    user = cfg.rope
    if user.scaling == "none":
        rope = ckpt_rope
    else:
        if ckpt_rope.scaling not in ("none", "abf") and ckpt_rope.scaling != user.scaling:
            get_logger().warning("init.from=%s uses rope scaling %r; rope.scaling=%r replaces it",
                                 path, ckpt_rope.scaling, user.scaling)
        scaling = {name: getattr(user, name) for name in _ROPE_SCALING_FIELDS}
        theta = user.theta if user.scaling in ("abf", "entropy_abf") else ckpt_rope.theta
        if scaling.get("original_max_position_embeddings") is None:
            # Extending: the checkpoint's trained length is the "original" length the scaling
            # starts from, and the model now claims the new training length.
            scaling["original_max_position_embeddings"] = model.max_position_embeddings
        rope = dataclasses.replace(ckpt_rope, theta=theta, **scaling)
        longest = max(stage.seq_len for stage in stages(cfg))
        model = dataclasses.replace(
            model, max_position_embeddings=max(model.max_position_embeddings, longest))
    return dataclasses.replace(cfg, model=model, rope=rope, data=data)
