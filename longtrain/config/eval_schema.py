"""Typed configuration of `longtrain-eval`: the single source of its defaults.

The run-wide groups (attention, parallel, launcher, logging, data) are the training schema's
own dataclasses, so `parallel.tp=`, `attention=ring`, `logging.wandb.mode=` mean the same in
both commands. The model and RoPE are not configured here: they come from the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from longtrain.config.schema import (AttentionConfig, DataConfig, LauncherConfig,
                                     LoggingConfig, ParallelConfig)

EVAL_BACKENDS = ("longtrain", "transformers")


@dataclass
class EvalConfig:
    # a synthetic task of longtrain.data.synthetic.TASKS: passkey | multikey_needle | assoc_recall
    task: str = "passkey"
    # context lengths in tokens; each is padded at the end to a multiple of 2 * parallel.cp
    # (causal attention never looks at the padding)
    lengths: List[int] = field(default_factory=lambda: [256, 512, 1024])
    # where the queried fact sits: 0 = start of the context, 1 = end
    depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    # prompts per (length, depth) cell
    samples: int = 4
    # prompt draws (a random stream separate from training samples)
    seed: int = 0
    # perplexity vs length on `data` sequences of these lengths; empty skips it
    perplexity_lengths: List[int] = field(default_factory=list)
    # sequences per perplexity length
    perplexity_samples: int = 4
    # longtrain: our model on the Ray worker group (TP x CP x DP);
    # transformers: AutoModelForCausalLM in this process (fp32, CPU), a Hugging Face dir only
    backend: str = "longtrain"


@dataclass
class EvalRunConfig:
    # a Hugging Face model directory or a longtrain checkpoint (required)
    checkpoint: Optional[str] = None
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # the perplexity sequences (data.tokenizer also tokenizes the prompts); conf/longtrain_conf/eval.yaml
    # makes data.task follow eval.task
    data: DataConfig = field(default_factory=DataConfig)
    # fp32 | bf16: the dtype the weights are evaluated in
    precision: str = "fp32"
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Where eval.json, the heatmap and the W&B run go; Hydra sets it to its run directory.
    output_dir: str = "outputs/eval/latest"
