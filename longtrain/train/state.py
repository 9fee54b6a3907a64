"""A run's whole training state (model, optimizer, RNG) as a native checkpoint: saved and
restored in any layout through the canonical views of longtrain.checkpoint.native."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from longtrain.checkpoint.native import (CheckpointError, canonical_views, model_mismatch,
                                         read_manifest, tp_mesh, write_checkpoint)
from longtrain.model.llama import LlamaModel
from longtrain.parallel.runtime import ParallelRuntime
from longtrain.train.optim import Optimizer

_MOMENTS = ("exp_avg", "exp_avg_sq")


def _ensure_adam_state(optimizer: Optimizer) -> None:
    """Zero moments for parameters that have not been stepped yet (a checkpoint at step 0)."""
    for m in optimizer.master:
        state = optimizer.inner.state[m]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(m, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(m, memory_format=torch.preserve_format)


def _train_state_dict(model: LlamaModel, optimizer: Optimizer, *, mesh,
                      rank_key: str) -> dict[str, Any]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    by_param = {id(p): m for p, m in zip(optimizer.params, optimizer.master)}
    params = dict(model.named_parameters())
    master = {n: by_param[id(params[n])] for n in names}
    _ensure_adam_state(optimizer)
    sd: dict[str, Any] = {}
    for name, view in canonical_views(model, master, mesh=mesh).items():
        sd[f"model.{name}"] = view
    for moment in _MOMENTS:
        moments = {n: optimizer.inner.state[master[n]][moment] for n in names}
        for name, view in canonical_views(model, moments, mesh=mesh).items():
            sd[f"optim.{moment}.{name}"] = view
    # AdamW's step count is the same for every parameter: one scalar.
    sd["optim.step"] = optimizer.inner.state[master[names[0]]]["step"].detach().clone().cpu()
    sd[rank_key] = torch.get_rng_state()
    return sd


def save_train_state(root: str, *, step: int, model: LlamaModel, optimizer: Optimizer,
                     runtime: ParallelRuntime, keep: int, meta: dict[str, Any]) -> str:
    """Write the full training state at `step` under `root` (a collective: every rank calls
    it); returns the checkpoint's path. `meta` (configs, data position, ...) goes into the
    manifest. Keeps the newest `keep` checkpoints."""
    dims = runtime.dims
    # ZeRO: the shards gathered into full per-parameter state, as the plain optimizer has
    with optimizer.materialized():
        sd = _train_state_dict(model, optimizer, mesh=tp_mesh(runtime),
                               rank_key=f"rng.rank{runtime.rank}")
        return write_checkpoint(
            root, step=step, state_dict=sd, rank=runtime.rank, keep=keep,
            layout={"world_size": dims.world_size, "tp": dims.tp, "cp": dims.cp, "dp": dims.dp},
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
    # ZeRO: loaded into full per-parameter state, then written back into the shards
    with optimizer.materialized(load=True):
        sd = _train_state_dict(model, optimizer, mesh=tp_mesh(runtime), rank_key=rank_key)
        if not same_world:
            # Per-rank RNG streams do not map onto another world size; the loop reseeds.
            del sd[rank_key]
        step_tensor = sd["optim.step"]
        dcp.load(sd, checkpoint_id=path)
        for m in optimizer.master:
            optimizer.inner.state[m]["step"] = step_tensor.clone()
        if same_world:
            torch.set_rng_state(sd[rank_key])
        if optimizer.mixed:
            with torch.no_grad():
                for p, m in zip(optimizer.params, optimizer.master):
                    p.copy_(m.to(p.dtype))
    return manifest
