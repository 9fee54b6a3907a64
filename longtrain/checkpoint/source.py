"""Where a model's weights come from: a Hugging Face directory or a native checkpoint.

`init.from`, `longtrain-eval` and `longtrain-export` accept either; this module is the one
place that tells them apart, so callers never branch on the format.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch

from longtrain.checkpoint.hf import open_hf_weights, read_hf_config
from longtrain.checkpoint.native import (CheckpointError, find_checkpoint, is_native_checkpoint,
                                         manifest_configs, open_native_weights, read_manifest)
from longtrain.config.schema import ModelConfig, RopeConfig, RunConfig
from longtrain.data.tokenizer import (BYTE, has_tokenizer, load_tokenizer, same_vocabulary,
                                      tokenizer_problems)

__all__ = ["open_source_weights", "read_model_source", "source_kind", "source_problems",
           "source_tokenizer", "tokenizer_warnings"]


def source_kind(path: str) -> str:
    """"native" for a longtrain checkpoint (or a directory of them), "hf" otherwise."""
    return "native" if is_native_checkpoint(path) else "hf"


def source_problems(path: str, *, field: str) -> list[str]:
    """What is wrong with `path` as a weight source, as messages naming `field`."""
    if not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        return [f"{field}={path!r} {what} (expected a Hugging Face model directory or a "
                f"longtrain checkpoint)"]
    if source_kind(path) == "native":
        try:
            find_checkpoint(path)
        except CheckpointError as exc:
            return [f"{field}: {exc}"]
        return []
    if not os.path.isfile(os.path.join(path, "config.json")):
        return [f"{field}={path!r} has no config.json and no manifest.json (expected a Hugging "
                f"Face model directory or a longtrain checkpoint)"]
    return []


def read_model_source(path: str) -> tuple[ModelConfig, RopeConfig]:
    """The model and RoPE configuration stored with the weights at `path`."""
    if source_kind(path) == "native":
        return manifest_configs(read_manifest(find_checkpoint(path)))

    return read_hf_config(path)


def source_tokenizer(path: str) -> Optional[str]:
    """The tokenizer that goes with the weights at `path`, as a `data.tokenizer` value: a
    Hugging Face directory holding tokenizer files -> its absolute path; a native checkpoint
    -> the tokenizer its run trained with (its manifest records it); None when unknown."""
    if source_kind(path) == "native":
        data = read_manifest(find_checkpoint(path)).get("data")
        recorded = data.get("tokenizer") if isinstance(data, dict) else None
        if recorded == BYTE:
            return BYTE
        if isinstance(recorded, str) and os.path.isdir(recorded) and has_tokenizer(recorded):
            return recorded
        return None
    if os.path.isdir(path) and has_tokenizer(path):
        return os.path.abspath(path)
    return None


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def tokenizer_warnings(cfg: RunConfig) -> list[str]:
    """Warnings about `data.tokenizer` (resolved by `apply_init_from`) against the tokenizer
    `init.from` was trained with: another vocabulary, or none known. Ids that do not fit the
    embedding are an error of `longtrain.planning.validate` instead."""
    path, spec = cfg.init_from, cfg.data.tokenizer
    if not path or tokenizer_problems(spec):
        return []
    own = source_tokenizer(path)
    if own is None:
        if spec != BYTE:
            return []
        return [f"init.from={path!r} holds no tokenizer, so data.tokenizer is the byte tokenizer "
                f"(ids 0-258); unless the model was trained on it, set data.tokenizer to the "
                f"model's tokenizer directory"]
    if spec == own or (spec != BYTE and own != BYTE and _same_path(spec, own)):
        return []
    try:
        mine, theirs = load_tokenizer(spec), load_tokenizer(own)
    except ValueError:
        # reported by validation
        return []
    if same_vocabulary(mine, theirs):
        return []
    return [f"data.tokenizer={spec!r} ({mine.vocab_size} ids) is not the tokenizer of "
            f"init.from={path!r} ({own!r}, {theirs.vocab_size} ids): the model's embeddings "
            f"were trained on other token ids"]


@contextmanager
def open_source_weights(path: str) -> Iterator[Callable[[str], torch.Tensor]]:
    """A getter of canonical (Hugging Face-named, full) tensors, valid inside the block."""
    if source_kind(path) == "native":
        with open_native_weights(path) as get:
            yield get
        return

    with open_hf_weights(path) as get:
        yield get
