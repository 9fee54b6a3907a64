"""Where a model's weights come from: a Hugging Face directory or a native checkpoint.

`init.from`, `longtrain-eval` and `longtrain-export` accept either; this module is the one
place that tells them apart, so callers never branch on the format.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from longtrain.config.schema import ModelConfig, RopeConfig

__all__ = ["open_source_weights", "read_model_source", "source_kind"]


def source_kind(path: str) -> str:
    """"hf" for a Hugging Face model directory, "native" for a longtrain checkpoint."""
    return "hf"


def read_model_source(path: str) -> tuple[ModelConfig, RopeConfig]:
    """The model and RoPE configuration stored with the weights at `path`."""
    from longtrain.checkpoint.hf import read_hf_config

    return read_hf_config(path)


@contextmanager
def open_source_weights(path: str) -> Iterator[Callable[[str], torch.Tensor]]:
    """A getter of canonical (Hugging Face-named, full) tensors, valid inside the block."""
    from longtrain.checkpoint.hf import open_hf_weights

    with open_hf_weights(path) as get:
        yield get
