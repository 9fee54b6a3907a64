"""Pre-flight of `longtrain-eval`: every bad setting found before any worker starts, and the
driver-side preparation (the checkpoint's model config, a packed perplexity corpus).

The parallel layout, attention, model-vs-TP and tokenizer-vs-vocabulary checks are the
training validator's (`longtrain.planning.validate.problems`), run on a RunConfig built from the
eval config and the checkpoint's model; only the evaluation's own fields are checked here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from longtrain.checkpoint.source import (read_model_source, source_kind, source_problems,
                                         source_tokenizer)
from longtrain.config.errors import ConfigError
from longtrain.config.eval_schema import EVAL_BACKENDS, EvalConfig, EvalRunConfig
from longtrain.config.schema import (AttentionConfig, DataConfig, ModelConfig, ParallelConfig,
                                     RopeConfig, RunConfig, TrainConfig)
from longtrain.data.loader import source_problems as data_source_problems
from longtrain.data.packed import PackedCorpus
from longtrain.data.prepare import prepare_data
from longtrain.data.synthetic import TASKS
from longtrain.data.tokenizer import AUTO, BYTE, Tokenizer, load_tokenizer, tokenizer_problems
from longtrain.eval.scoring import padded_length
from longtrain.parallel.dims import ParallelDims
from longtrain.planning.validate import problems

PRECISIONS = ("fp32", "bf16")
# data.seq_len of the RunConfig handed to the training validator: long enough for every
# synthetic task, so its data checks (which are about training sequences) stay quiet; the
# evaluation's own lengths are checked here.
_NEUTRAL_SEQ_LEN = 4096


@dataclass(frozen=True)
class EvalPlan:
    """A validated evaluation: its config (data prepared), the checkpoint's model and RoPE,
    and the warnings to show (nothing that stops the run)."""

    cfg: EvalRunConfig
    model: ModelConfig
    rope: RopeConfig
    warnings: tuple[str, ...] = ()


def _checkpoint_problems(cfg: EvalRunConfig
                         ) -> tuple[list[str], Optional[tuple[ModelConfig, RopeConfig]]]:
    path = cfg.checkpoint
    if not path:
        return ["checkpoint is not set: pass checkpoint=<a Hugging Face model directory or a "
                "longtrain checkpoint>"], None
    found = source_problems(path, field="checkpoint")
    if found:
        return found, None
    try:
        source = read_model_source(path)
    except (ValueError, FileNotFoundError, OSError) as exc:
        return [f"checkpoint={path!r}: {exc}"], None
    if cfg.eval.backend == "transformers" and source_kind(path) != "hf":
        return [f"eval.backend='transformers' reads Hugging Face directories; checkpoint={path!r} "
                f"is a {source_kind(path)} checkpoint (convert it first: longtrain-export "
                f"checkpoint=... out=... format=hf)"], source
    return [], source


def _grid_problems(ev: EvalConfig, tokenizer: Optional[Tokenizer]) -> list[str]:
    out = []
    if ev.task not in TASKS:
        out.append(f"eval.task={ev.task!r} is not one of {sorted(TASKS)}")
    if ev.backend not in EVAL_BACKENDS:
        out.append(f"eval.backend={ev.backend!r} is not one of {list(EVAL_BACKENDS)}")
    if not ev.lengths:
        out.append("eval.lengths=[] is empty: pass eval.lengths=[1024,2048,...]")
    bad = [n for n in ev.lengths if n < 1]
    if bad:
        out.append(f"eval.lengths={list(ev.lengths)}: {bad} must be >= 1")
    if not ev.depths:
        out.append("eval.depths=[] is empty: pass eval.depths=[0.0,0.5,1.0] (fractions of the "
                   "context)")
    bad_depths = [d for d in ev.depths if not 0.0 <= d <= 1.0]
    if bad_depths:
        out.append(f"eval.depths={list(ev.depths)}: {bad_depths} outside [0, 1] (0 = start of "
                   f"the context, 1 = end)")
    if ev.samples < 1:
        out.append(f"eval.samples={ev.samples} must be >= 1 (prompts per length and depth)")
    bad = [n for n in ev.perplexity_lengths if n < 1]
    if bad:
        out.append(f"eval.perplexity_lengths={list(ev.perplexity_lengths)}: {bad} must be >= 1")
    if ev.perplexity_lengths and ev.perplexity_samples < 1:
        out.append(f"eval.perplexity_samples={ev.perplexity_samples} must be >= 1")
    if ev.task in TASKS and tokenizer is not None:
        # the task's own "too short" error, once per length (the prompt's length is the same
        # at every depth); lengths are padded for the CP layout, so no other length is wrong
        for n in sorted({n for n in ev.lengths if n >= 1}):
            try:
                TASKS[ev.task].prompt(length=n, depth=0.0, seed=ev.seed, index=0,
                                      tokenizer=tokenizer)
            except ValueError as exc:
                out.append(f"eval.lengths: {exc}")
    return out


def _perplexity_data_problems(cfg: EvalRunConfig) -> list[str]:
    out: list[str] = []
    for n in cfg.eval.perplexity_lengths:
        if n < 1:
            continue
        for problem in data_source_problems(dataclasses.replace(cfg.data, seq_len=n)):
            # a length problem belongs to this perplexity length; the others name data fields
            if f"data.seq_len={n}" in problem:
                problem = f"eval.perplexity_lengths ({n}): {problem}"
            if problem not in out:
                out.append(problem)
    return out


def as_run_config(cfg: EvalRunConfig, model: ModelConfig, rope: RopeConfig) -> RunConfig:
    """The training RunConfig whose validation covers this evaluation's layout: the
    checkpoint's model, the eval's attention / parallel / launcher / logging / precision and
    tokenizer (the transformers backend runs in one process with dense attention)."""
    hf = cfg.eval.backend == "transformers"
    parallel = ParallelConfig(world_size=1, tp=1, cp=1) if hf else cfg.parallel
    dims = ParallelDims.from_config(parallel)
    longest = max([*cfg.eval.lengths, *cfg.eval.perplexity_lengths, _NEUTRAL_SEQ_LEN])
    seq_len = padded_length(longest, cp_size=max(1, parallel.cp))
    data = DataConfig(tokenizer=cfg.data.tokenizer, seq_len=seq_len,
                      batch_size=max(1, dims.dp) if not dims.problems() else 1)
    return RunConfig(model=model, rope=rope,
                     attention=AttentionConfig() if hf else cfg.attention, parallel=parallel,
                     data=data, launcher=cfg.launcher, logging=cfg.logging,
                     train=TrainConfig(precision=cfg.precision if cfg.precision in PRECISIONS
                                       else "fp32", save_hf=False),
                     output_dir=cfg.output_dir)


def eval_problems(cfg: EvalRunConfig) -> tuple[list[str], Optional[tuple[ModelConfig, RopeConfig]]]:
    """Every problem of `cfg` as a message naming fields and values, and the checkpoint's
    (model, rope) when it could be read."""
    out, source = _checkpoint_problems(cfg)
    tokenizer = None
    if not tokenizer_problems(cfg.data.tokenizer):
        try:
            tokenizer = load_tokenizer(cfg.data.tokenizer)
        except ValueError as exc:
            out.append(str(exc))
    out += _grid_problems(cfg.eval, tokenizer)
    if cfg.precision not in PRECISIONS:
        out.append(f"precision={cfg.precision!r} is not one of {list(PRECISIONS)}")
    if source is not None:
        model, rope = source
        out += [p for p in problems(as_run_config(cfg, model, rope)) if p not in out]
    else:
        # no model to check the layout against: still report the layout's own problems
        out += ParallelDims.from_config(cfg.parallel).problems()
    out += [p for p in _perplexity_data_problems(cfg) if p not in out]
    return out, source


def _prepare_perplexity_data(cfg: EvalRunConfig) -> EvalRunConfig:
    """Tokenize and pack a files / hf corpus once, here on the driver (as training does)."""
    ev = cfg.eval
    if not ev.perplexity_lengths or cfg.data.source == "synthetic" or cfg.data.streaming:
        return cfg
    longest = max(ev.perplexity_lengths)
    data = prepare_data(RunConfig(data=dataclasses.replace(cfg.data, seq_len=longest))).data
    if data.packed is not None:
        available = PackedCorpus(data.packed).num_sequences(longest)
        if available < ev.perplexity_samples:
            raise ConfigError([f"eval.perplexity_samples={ev.perplexity_samples} sequences of "
                               f"{longest} tokens do not fit in the corpus ({available} do); "
                               f"lower eval.perplexity_samples or the longest "
                               f"eval.perplexity_lengths"])
    return dataclasses.replace(cfg, data=dataclasses.replace(data, seq_len=cfg.data.seq_len))


def _resolve_tokenizer(cfg: EvalRunConfig) -> EvalRunConfig:
    """`data.tokenizer=auto`: the checkpoint's tokenizer when it has one, else byte."""
    if cfg.data.tokenizer != AUTO or not cfg.checkpoint \
            or source_problems(cfg.checkpoint, field="checkpoint"):
        return cfg
    spec = source_tokenizer(cfg.checkpoint) or BYTE
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=spec))


def plan_eval(cfg: EvalRunConfig) -> EvalPlan:
    """Validate `cfg` (raises ConfigError naming every problem) and prepare its data;
    `data.tokenizer=auto` becomes the checkpoint's tokenizer."""
    cfg = _resolve_tokenizer(cfg)
    found, source = eval_problems(cfg)
    if found:
        raise ConfigError(found)
    assert source is not None
    model, rope = source
    warnings = []
    beyond = sorted({n for n in cfg.eval.lengths + cfg.eval.perplexity_lengths
                     if n > model.max_position_embeddings})
    if beyond:
        warnings.append(f"lengths {beyond} exceed the checkpoint's max_position_embeddings="
                        f"{model.max_position_embeddings}: evaluating beyond the trained context")
    return EvalPlan(cfg=_prepare_perplexity_data(cfg), model=model, rope=rope,
                    warnings=tuple(warnings))
