"""Conversion between checkpoint formats, in one process and from any saved layout:
native (sharded DCP) -> Hugging Face directory, Hugging Face -> native (weights only), and
either to itself (re-sharding a Hugging Face export, or slimming a training checkpoint to
its weights). Every tensor passes through its canonical name, so the parallel layout that
wrote the source never matters."""

from __future__ import annotations

from typing import Optional

import torch

from longtrain.checkpoint.source import open_source_weights, read_model_source, source_kind
from longtrain.model.sharding import canonical_shapes
from longtrain.observability.log import get_logger

__all__ = ["FORMATS", "DTYPES", "convert"]

FORMATS = ("hf", "native")
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def convert(source: str, out: str, *, format: str = "hf", dtype: str = "auto",
            max_shard_bytes: int = 2 * 1024**3) -> str:
    """Write the weights at `source` (Hugging Face dir or native checkpoint) to `out` in
    `format`; `dtype` casts the weights (auto keeps them). Atomic: `out` appears complete or
    not at all, and an existing `out` is replaced only after the new one is complete."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of {list(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {list(DTYPES)}")
    cast: Optional[torch.dtype] = DTYPES[dtype]
    model, rope = read_model_source(source)
    names = list(canonical_shapes(model))
    with open_source_weights(source) as get:
        tensors = ((name, get(name) if cast is None else get(name).to(cast)) for name in names)
        if format == "hf":
            from longtrain.checkpoint.hf import write_hf

            write_hf(tensors, model=model, rope=rope, out_dir=out,
                     max_shard_bytes=max_shard_bytes)
        else:
            from longtrain.checkpoint.native import write_weights_checkpoint

            write_weights_checkpoint(out, dict(tensors), model=model, rope=rope,
                                     meta={"converted_from": source})
    get_logger().info("converted %s (%s) to %s (%s)", source, source_kind(source), out, format)
    return out
