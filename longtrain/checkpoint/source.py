"""Where a model's weights come from: a Hugging Face directory or a native checkpoint.

`init.from`, `longtrain-eval` and `longtrain-export` accept either; this module is the one
place that tells them apart, so callers never branch on the format.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from longtrain.config.schema import ModelConfig, RopeConfig

__all__ = ["open_source_weights", "read_model_source", "source_kind", "source_problems"]


def source_kind(path: str) -> str:
    """"native" for a longtrain checkpoint (or a directory of them), "hf" otherwise."""
    from longtrain.checkpoint.native import is_native_checkpoint

    return "native" if is_native_checkpoint(path) else "hf"


def source_problems(path: str, *, field: str) -> list[str]:
    """What is wrong with `path` as a weight source, as messages naming `field`."""
    from longtrain.checkpoint.native import CheckpointError, find_checkpoint

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
        from longtrain.checkpoint.native import find_checkpoint, manifest_configs, read_manifest

        return manifest_configs(read_manifest(find_checkpoint(path)))
    from longtrain.checkpoint.hf import read_hf_config

    return read_hf_config(path)


@contextmanager
def open_source_weights(path: str) -> Iterator[Callable[[str], torch.Tensor]]:
    """A getter of canonical (Hugging Face-named, full) tensors, valid inside the block."""
    if source_kind(path) == "native":
        from longtrain.checkpoint.native import open_native_weights

        with open_native_weights(path) as get:
            yield get
        return
    from longtrain.checkpoint.hf import open_hf_weights

    with open_hf_weights(path) as get:
        yield get
