"""Conversion between checkpoint formats, in one process and from any saved layout:
native (sharded DCP) -> Hugging Face directory, Hugging Face -> native (weights only), and
either to itself (re-sharding a Hugging Face export, or slimming a training checkpoint to
its weights). Every tensor passes through its canonical name, so the parallel layout that
wrote the source never matters."""

from __future__ import annotations

import os
from typing import Optional

import torch

from longtrain.checkpoint.hf import write_hf
from longtrain.checkpoint.inference_files import inference_files
from longtrain.checkpoint.native import MANIFEST, write_weights_checkpoint
from longtrain.checkpoint.source import (open_source_weights, read_model_source, source_kind,
                                         source_tokenizer)
from longtrain.data.tokenizer import AUTO, BYTE, without_source
from longtrain.model.sharding import canonical_shapes
from longtrain.observability.log import get_logger

__all__ = ["FORMATS", "DTYPES", "convert"]

FORMATS = ("hf", "native")
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def convert(source: str, out: str, *, format: str = "hf", dtype: str = "auto",
            max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False,
            tokenizer: Optional[str] = None) -> str:
    """Write the weights at `source` (Hugging Face dir or native checkpoint) to `out` in
    `format`; `dtype` casts the weights (auto keeps them). Staged: the files appear once
    complete. An "hf" export carries the model's token ids, generation config and tokenizer
    files (those of `tokenizer`, a `data.tokenizer` value, when given; else the source's),
    and writes to an existing `out` only as `longtrain.checkpoint.export_dir` allows
    (`overwrite` for a directory that is not an earlier export)."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of {list(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {list(DTYPES)}")
    cast: Optional[torch.dtype] = DTYPES[dtype]
    model, rope = read_model_source(source)
    names = list(canonical_shapes(model))
    if tokenizer in (None, AUTO):
        tokenizer = source_tokenizer(source)
    if tokenizer is not None and without_source(tokenizer) != BYTE:
        tokenizer = os.path.abspath(tokenizer)
    with open_source_weights(source) as get:
        tensors = ((name, get(name) if cast is None else get(name).to(cast)) for name in names)
        if format == "hf":
            hf_source = source_kind(source) == "hf"
            inference = inference_files(tokenizer, model_dir=source if hf_source else None)
            write_hf(tensors, model=model, rope=rope, out_dir=out,
                     max_shard_bytes=max_shard_bytes, inference=inference, overwrite=overwrite)
        else:
            # a native checkpoint is replaced as a whole directory, so only an earlier one may be
            if os.path.isdir(out) and os.listdir(out) \
                    and not os.path.isfile(os.path.join(out, MANIFEST)):
                raise ValueError(f"out={out!r} is not empty and is not a longtrain checkpoint "
                                 f"(it holds {', '.join(sorted(os.listdir(out))[:5])}); "
                                 f"format=native writes a whole directory: choose a new one")

            write_weights_checkpoint(out, dict(tensors), model=model, rope=rope,
                                     # the tokenizer: what a later export carries
                                     meta={"converted_from": source,
                                           "data": {"tokenizer": tokenizer}})
    get_logger().info("converted %s (%s) to %s (%s)", source, source_kind(source), out, format)
    return out
