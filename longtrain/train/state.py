"""A run's whole training state (model, optimizer, RNG) as a native checkpoint: saved and
restored in any layout through the canonical views of longtrain.checkpoint.native."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from longtrain.checkpoint.chunks import LoadPlanner
from longtrain.checkpoint.native import (CheckpointError, canonical_views, model_mismatch,
                                         read_manifest, write_checkpoint)
from longtrain.model.llama import LlamaModel
from longtrain.parallel.runtime import ParallelRuntime
from longtrain.train.optim import Optimizer
from longtrain.train.zero import MOMENTS


def _train_state_dict(model: LlamaModel, optimizer: Optimizer, *,
                      rank_key: str) -> dict[str, Any]:
    """The checkpoint's entries as this rank holds them (chunks of the canonical tensors:
    nothing is gathered, whatever the sharding level)."""
    held = dict(zip(map(id, optimizer.params), optimizer.held_state()))
    by_name = {n: held[id(p)] for n, p in model.named_parameters() if p.requires_grad}
    sd: dict[str, Any] = {}
    for key, prefix in (("master", "model"), *((m, f"optim.{m}") for m in MOMENTS)):
        views = canonical_views(model, {n: state[key] for n, state in by_name.items()})
        sd.update({f"{prefix}.{name}": view for name, view in views.items()})
    # AdamW's step count is the same for every parameter: one scalar.
    sd["optim.step"] = torch.tensor(float(optimizer.step_count))
    sd[rank_key] = torch.get_rng_state()
    return sd


def save_train_state(root: str, *, step: int, model: LlamaModel, optimizer: Optimizer,
                     runtime: ParallelRuntime, keep: int, meta: dict[str, Any]) -> str:
    """Write the full training state at `step` under `root` (a collective: every rank calls
    it); returns the checkpoint's path. `meta` (configs, data position, ...) goes into the
    manifest. Keeps the newest `keep` checkpoints."""
    dims = runtime.dims
    sd = _train_state_dict(model, optimizer, rank_key=f"rng.rank{runtime.rank}")
    return write_checkpoint(
        root, step=step, state_dict=sd, rank=runtime.rank, keep=keep,
        layout={"world_size": dims.world_size, "tp": dims.tp, "cp": dims.cp, "dp": dims.dp,
                "zero": getattr(optimizer.cfg, "zero", 0)},
        meta={"model": dataclasses.asdict(model.cfg), **meta})


def load_train_state(path: str, *, model: LlamaModel, optimizer: Optimizer,
                     runtime: ParallelRuntime) -> dict[str, Any]:
    """Restore model, optimizer and (same world size) RNG from the checkpoint at `path` into
    this rank's layout, whatever layout saved it (a collective). Returns the manifest."""
    manifest = read_manifest(path)
    if manifest.get("weights_only"):
        raise CheckpointError(f"checkpoint {path!r} holds weights only (no optimizer state): "
                              f"start from it with init.from={path}, not by resuming")
    diffs = model_mismatch(manifest, model.cfg)
    if diffs:
        raise CheckpointError(f"checkpoint {path!r} was saved from another model: "
                              + "; ".join(diffs))
    same_world = manifest["layout"]["world_size"] == runtime.dims.world_size
    rank_key = f"rng.rank{runtime.rank}"
    # each rank reads into the chunks it holds (its ZeRO / FSDP share of its TP shard)
    sd = _train_state_dict(model, optimizer, rank_key=rank_key)
    if not same_world:
        # Per-rank RNG streams do not map onto another world size; the loop reseeds.
        del sd[rank_key]
    dcp.load(sd, checkpoint_id=path, planner=LoadPlanner())
    optimizer.loaded(int(sd["optim.step"]))
    if same_world:
        torch.set_rng_state(sd[rank_key])
    return manifest
