"""Native checkpoints: torch.distributed.checkpoint (DCP), sharded and reshardable.

Layout of a checkpoint root (`checkpoint.dir`, default `<output_dir>/checkpoints`):

    step_00000100/            one complete checkpoint
        manifest.json         step, configs, layout, data position, every file and its size
        .metadata, *.distcp   DCP's files
    .step_00000200.tmp/       a save in progress (never read; removed by the next save)

Tensors are stored under canonical Hugging Face names (`model.<name>`, `optim.exp_avg.<name>`,
...), each rank writing the chunks it holds at their global offsets (`chunks.Chunked`: its TP
shard, and within it its ZeRO / FSDP share), so any other layout (another TP, CP or DP
degree, another sharding level, or one process) loads it: DCP reads exactly the pieces each
rank needs, and no rank ever gathers a full tensor. Replicated copies (DP and CP ranks
without sharding, norms across TP) are written once.

A save writes into the hidden temporary directory; only after every rank finished and the
manifest (written last) is in place is it renamed to `step_N`. A crash mid-save leaves the
previous checkpoints untouched, and a truncated or altered file is caught by the manifest's
sizes before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from longtrain.checkpoint.chunks import Chunked, Rect, SavePlanner, held_parts
from longtrain.config.schema import ModelConfig, RopeConfig
from longtrain.model.sharding import canonical_shapes, shard_specs
from longtrain.observability.log import get_logger

if TYPE_CHECKING:
    from longtrain.model.llama import LlamaModel

__all__ = ["CheckpointError", "ResumeChoice", "canonical_views", "choose_resume",
           "find_checkpoint", "is_native_checkpoint", "list_checkpoints", "model_mismatch",
           "open_native_weights", "read_manifest", "resolve_resume", "write_checkpoint",
           "write_weights_checkpoint"]

FORMAT = "longtrain-dcp/1"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
# a save in progress, or one that died part-way
_STALE = re.compile(r"^\.step_\d{8}\.tmp$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit the run (names the path)."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------
# finding and verifying


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of the checkpoint directory `path`, after checking that every file it
    lists is present with its recorded size."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint {path!r} has no {MANIFEST}: it is incomplete (a save "
                              f"that did not finish) or not a longtrain checkpoint")
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: malformed manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{file}: format {got!r} is not {FORMAT!r}")
    problems = []
    for name, size in sorted(manifest.get("files", {}).items()):
        fpath = os.path.join(path, name)
        if not os.path.isfile(fpath):
            problems.append(f"{name} is missing")
        elif os.path.getsize(fpath) != size:
            problems.append(f"{name} is {os.path.getsize(fpath)} bytes, the manifest says {size}")
    if problems:
        raise CheckpointError(f"checkpoint {path!r} is truncated or damaged: "
                              + "; ".join(problems))
    return manifest


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints under `root` (those with a manifest), by step."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, MANIFEST)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def is_native_checkpoint(path: str) -> bool:
    """True for a checkpoint directory or a root holding `step_*` checkpoints."""
    return os.path.isfile(os.path.join(path, MANIFEST)) or bool(list_checkpoints(path))


def find_checkpoint(path: str) -> str:
    """The checkpoint `path` names: itself if it is one, else the newest complete one under
    it. Verified (see `read_manifest`); raises CheckpointError naming the path otherwise."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        read_manifest(path)
        return path
    found = list_checkpoints(path)
    if not found:
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint {path!r} does not exist")
        raise CheckpointError(f"{path!r} is not a longtrain checkpoint: no {MANIFEST} in it and "
                              f"no complete step_* checkpoints under it")
    newest = found[-1][1]
    read_manifest(newest)
    return newest


def manifest_configs(manifest: dict[str, Any]) -> tuple[ModelConfig, RopeConfig]:
    """The model and RoPE configs a checkpoint was saved with (fields added since default)."""
    def known(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    return known(ModelConfig, manifest["model"]), known(RopeConfig, manifest["rope"])


def model_mismatch(manifest: dict[str, Any], model: ModelConfig) -> list[str]:
    """The model fields whose saved values differ from `model` (name and the position limit
    may differ: a resumed run can extend it)."""
    saved = manifest.get("model", {})
    return [f"model.{k}: checkpoint {saved.get(k)!r}, run {v!r}"
            for k, v in dataclasses.asdict(model).items()
            if k not in ("name", "max_position_embeddings") and saved.get(k) != v]


# ---------------------------------------------------------------------------------------
# canonical views of this rank's tensors


def canonical_views(model: "LlamaModel", held_by_name: dict[str, Any]) -> dict[str, Chunked]:
    """canonical name -> the chunks of it this rank holds, viewing (sharing storage with)
    the local tensors, at their offsets in the full canonical tensor.

    `held_by_name` maps the model's parameter names to what this rank holds of a tensor
    shaped like its TP-local parameter (the parameter, its fp32 master or an optimizer
    moment): the whole tensor, a DTensor shard of it or a flat `Fragment` of it
    (`chunks.held_parts`)."""
    tp_rank = model.tp_rank
    shapes = canonical_shapes(model)
    out: dict[str, Chunked] = {}
    for spec in shard_specs(model):
        held = held_by_name[spec.local_name]
        # detached: DCP loads in place, which autograd refuses on views of parameters
        parts = [(rect, local.detach()) for rect, local in held_parts(held)]
        local_shape = tuple(held.shape)
        offset = 0
        for name in spec.pieces:
            full = shapes[name]
            if spec.dim is None:
                piece, shift = Rect.whole(full), [0] * len(full)
            else:
                per_rank = -(-full[spec.dim] // model.shape.tp)
                # torch.chunk semantics (DTensor's): with vocabulary padding the last ranks
                # hold fewer real rows, or none; padding rows are not part of the canonical
                # tensor.
                valid = max(0, min(per_rank, full[spec.dim] - tp_rank * per_rank))
                starts = [0] * len(local_shape)
                lengths = list(local_shape)
                starts[spec.dim], lengths[spec.dim] = offset, valid
                piece = Rect(tuple(starts), tuple(lengths))
                shift = [0] * len(full)
                shift[spec.dim] = tp_rank * per_rank - offset
                offset += per_rank
            chunks = []
            for rect, local in parts:
                common = rect.intersect(piece)
                if common is not None:
                    chunks.append((tuple(s + d for s, d in zip(common.starts, shift)),
                                   common.view(local, origin=rect)))
            out[name] = Chunked(full, chunks)
    return out


# ---------------------------------------------------------------------------------------
# save


def _files_with_sizes(path: str) -> dict[str, int]:
    return {name: os.path.getsize(os.path.join(path, name)) for name in sorted(os.listdir(path))
            if os.path.isfile(os.path.join(path, name)) and name != MANIFEST}


def _write_manifest(path: str, manifest: dict[str, Any]) -> None:
    manifest = {**manifest, "files": _files_with_sizes(path)}
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MANIFEST))


def _commit(tmp: str, final: str) -> None:
    """Rename the finished `tmp` to `final`; an existing `final` is removed only after (a
    crash between the two renames leaves it as `<final>.old`, never deleted automatically)."""
    if os.path.lexists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def prune(root: str, *, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints under `root`; returns them."""
    found = list_checkpoints(root)
    doomed = [path for _, path in found[:-keep]] if keep > 0 else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def write_checkpoint(root: str, *, step: int, state_dict: dict[str, Any], rank: int,
                     layout: dict[str, int], meta: dict[str, Any], keep: int) -> str:
    """Write `state_dict` (each rank's part, DTensors where sharded) as the checkpoint of
    `step` under `root`: a collective, every rank calls it. It is written to a hidden
    directory, given its manifest, and renamed into place only when complete; the newest
    `keep` checkpoints are kept. Returns its path."""
    import torch.distributed.checkpoint as dcp

    final = os.path.join(root, step_dir_name(step))
    tmp = os.path.join(root, f".{step_dir_name(step)}.tmp")
    is_coordinator = rank == 0
    t0 = time.perf_counter()
    if is_coordinator:
        os.makedirs(root, exist_ok=True)
        # saves that died part-way (this run's or a crashed one's): never read, now removed
        for name in os.listdir(root):
            if _STALE.match(name):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    _barrier()
    try:
        dcp.save(state_dict, checkpoint_id=tmp, planner=SavePlanner())
    except BaseException:
        if is_coordinator:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    if is_coordinator:
        _write_manifest(tmp, {"format": FORMAT, "step": step, "created": time.time(),
                              "layout": layout, "weights_only": False, **meta})
        _commit(tmp, final)
        removed = prune(root, keep=keep)
        get_logger().info("saved checkpoint %s in %.2f s%s", final, time.perf_counter() - t0,
                          f" (removed {len(removed)} older)" if removed else "")
    _barrier()
    return final


def write_weights_checkpoint(path: str, tensors: dict[str, torch.Tensor], *,
                             model: ModelConfig, rope: RopeConfig,
                             meta: Optional[dict[str, Any]] = None) -> str:
    """A weights-only native checkpoint of canonical tensors, written by one process (the
    Hugging Face -> native import). Usable as `init.from`, not for resuming."""
    import torch.distributed.checkpoint as dcp

    path = os.path.abspath(path)
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dcp.save({f"model.{k}": v.contiguous() for k, v in tensors.items()}, checkpoint_id=tmp,
             no_dist=True)
    _write_manifest(tmp, {"format": FORMAT, "step": 0, "created": time.time(),
                          "layout": {"world_size": 1, "tp": 1, "cp": 1, "dp": 1},
                          "model": dataclasses.asdict(model), "rope": dataclasses.asdict(rope),
                          "weights_only": True, **(meta or {})})
    _commit(tmp, path)
    return path


# ---------------------------------------------------------------------------------------
# load


@contextmanager
def open_native_weights(path: str) -> Iterator[Callable[[str], torch.Tensor]]:
    """Getter of full canonical tensors from a native checkpoint, read in one process (no
    process group needed): `get(name)` reads only that tensor's pieces."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = find_checkpoint(path)
    meta = dcp.FileSystemReader(path).read_metadata()

    def get(name: str) -> torch.Tensor:
        key = f"model.{name}"
        entry = meta.state_dict_metadata.get(key)
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"checkpoint {path!r} has no tensor {name!r}")
        out = torch.empty(entry.size, dtype=entry.properties.dtype)
        dcp.load({key: out}, checkpoint_id=path, no_dist=True)
        return out

    yield get


@dataclasses.dataclass(frozen=True)
class ResumeChoice:
    """The checkpoint a run continues from (None: a fresh start) and the newer ones that
    were passed over as damaged: (path, why) each, newest first."""

    path: Optional[str]
    skipped: tuple[tuple[str, str], ...] = ()

    def skipped_lines(self) -> list[str]:
        """One line per skipped checkpoint, naming it and why, for the console and W&B."""
        return [f"{os.path.basename(path)} skipped: {why}" for path, why in self.skipped]


def choose_resume(resume: str, *, checkpoint_dir: str) -> ResumeChoice:
    """`resolve_resume`, also saying which newer checkpoints were skipped and why."""
    if resume == "never":
        return ResumeChoice(None)
    if resume != "auto":
        return ResumeChoice(find_checkpoint(resume))
    skipped: list[tuple[str, str]] = []
    for _, path in reversed(list_checkpoints(checkpoint_dir)):
        try:
            read_manifest(path)
        except CheckpointError as exc:
            get_logger().warning("skipping checkpoint: %s", exc)
            skipped.append((path, str(exc)))
            continue
        return ResumeChoice(path, tuple(skipped))
    return ResumeChoice(None, tuple(skipped))


def resolve_resume(resume: str, *, checkpoint_dir: str) -> Optional[str]:
    """The checkpoint a run continues from: `checkpoint.resume` = "never" -> None; "auto" ->
    the newest complete checkpoint in `checkpoint_dir` (None if there is none; a damaged
    newest one is skipped: `choose_resume` says which and why); a path -> that checkpoint
    (or the newest under it), verified."""
    return choose_resume(resume, checkpoint_dir=checkpoint_dir).path
