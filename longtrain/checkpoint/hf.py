"""Hugging Face Llama-family checkpoints: read their config and weights, and export ours
(starting a run from one, `init.from`, is resolved in longtrain.planning.resolve).

A Hugging Face directory holds `config.json` plus weights in `model.safetensors`, sharded
safetensors with `model.safetensors.index.json`, or (legacy) `pytorch_model.bin` and its index.
Weight names are the canonical names of `longtrain.model.sharding`, so import is
`load_canonical(model, get)` with the getter of `open_hf_weights`, and export streams
`iter_canonical` into safetensors files.

Llama, Mistral and Qwen2 are the same decoder for our purposes (Qwen2 adds q/k/v biases);
features our model does not compute (MLP biases, output-projection biases, sliding-window
attention, non-SiLU activations) are refused rather than silently dropped.

Over 450 lines on purpose: reading, exporting from a sharded model and writing from one
process share the file names, the config mapping and the shard writer.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

import torch

from longtrain.checkpoint.export_dir import commit_export_dir, make_staging_dir
from longtrain.checkpoint.inference_files import InferenceFiles
from longtrain.config.pattern import layer_kinds
from longtrain.config.schema import ModelConfig, RopeConfig
from longtrain.model.rope import LONGTRAIN_ROPE_KEY, rope_from_hf, rope_to_hf
from longtrain.model.sharding import iter_canonical
from longtrain.observability.log import get_logger

if TYPE_CHECKING:
    from longtrain.model.llama import LlamaModel

__all__ = ["export_hf", "hf_config_dict", "open_hf_weights", "read_hf_config"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
# Search order of `open_hf_weights` (safetensors first: lazy, and no pickle involved).
WEIGHT_FILE_NAMES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, TORCH_NAME, TORCH_INDEX_NAME)


def _load_json(path: str, *, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed {what} ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: {what} is not UTF-8 text ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def _require_dir(path: str, *, what: str) -> None:
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise ValueError(f"{what}={path!r} is not a directory (expected a Hugging Face model directory)")
        raise FileNotFoundError(f"{what}={path!r} does not exist (expected a Hugging Face model directory)")


def _positive_int(raw: dict[str, Any], key: str, *, where: str, default: Optional[int] = None) -> int:
    value = raw.get(key)
    # A JSON null means "use the default" (transformers writes num_key_value_heads: null).
    if value is None:
        value = default
    if value is None:
        raise ValueError(f"{where}: required field {key!r} is missing")
    # bool is an int subclass; `true` as a size is a broken config, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {key}={value!r} must be a positive integer")
    return value


def _positive_float(raw: dict[str, Any], key: str, *, where: str, default: float) -> float:
    value = raw.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{where}: {key}={value!r} must be a positive number")
    return float(value)


def _refuse_unsupported(raw: dict[str, Any], model_type: str, *, where: str) -> None:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act={act!r} is not supported (only 'silu': the MLP is SwiGLU)")
    if raw.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias={raw['mlp_bias']!r} is not supported (the MLP has no biases)")
    if model_type == "llama" and raw.get("attention_bias"):
        # transformers' Llama puts this bias on o_proj as well as q/k/v; our output projection
        # has none, so loading would silently drop weights.
        raise ValueError(f"{where}: attention_bias={raw['attention_bias']!r} is not supported for "
                         f"model_type='llama' (it also adds an o_proj bias, which the model lacks)")
    if model_type in ("mistral", "qwen2"):
        window = raw.get("sliding_window")
        # Mistral has no switch (a window is always used); Qwen2 has use_sliding_window.
        if window is not None and raw.get("use_sliding_window", True) is not False:
            switch = ("use_sliding_window absent" if "use_sliding_window" not in raw
                      else f"use_sliding_window={raw['use_sliding_window']!r}")
            raise ValueError(
                f"{where}: sliding_window={window!r} ({switch}) is active sliding-window attention, "
                f"which is not supported (only full causal attention); set sliding_window to null if "
                f"the window is not needed")


def read_hf_config(path: str) -> tuple[ModelConfig, RopeConfig]:
    """ModelConfig and RopeConfig of a Llama, Mistral or Qwen2 directory's config.json.

    Raises FileNotFoundError when the directory or its config.json is missing and ValueError
    (naming the field and its value) for malformed or unsupported configs.
    """
    _require_dir(path, what="init.from")
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} does not exist (expected a Hugging Face model directory)")
    raw = _load_json(config_path, what="config")

    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{config_path}: model_type={model_type!r} is not supported; "
                         f"supported: {list(SUPPORTED_MODEL_TYPES)}")
    _refuse_unsupported(raw, model_type, where=config_path)

    hidden = _positive_int(raw, "hidden_size", where=config_path)
    heads = _positive_int(raw, "num_attention_heads", where=config_path)
    kv_heads = _positive_int(raw, "num_key_value_heads", where=config_path, default=heads)
    head_dim = raw.get("head_dim")
    if head_dim is not None:
        head_dim = _positive_int(raw, "head_dim", where=config_path)
        if head_dim * heads == hidden:
            # The derived value; keeping None lets `model.head_dim` follow hidden_size overrides.
            head_dim = None
    elif hidden % heads:
        raise ValueError(f"{config_path}: hidden_size={hidden} is not divisible by "
                         f"num_attention_heads={heads} and head_dim is not set")
    model = ModelConfig(
        name=os.path.basename(os.path.normpath(os.path.abspath(path))),
        vocab_size=_positive_int(raw, "vocab_size", where=config_path),
        hidden_size=hidden,
        intermediate_size=_positive_int(raw, "intermediate_size", where=config_path),
        num_layers=_positive_int(raw, "num_hidden_layers", where=config_path),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        norm_eps=_positive_float(raw, "rms_norm_eps", where=config_path, default=1e-6),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; Llama's attention_bias was refused above.
        qkv_bias=model_type == "qwen2",
        max_position_embeddings=_positive_int(raw, "max_position_embeddings", where=config_path),
        init_std=_positive_float(raw, "initializer_range", where=config_path, default=ModelConfig().init_std),
    )
    try:
        rope = rope_from_hf(raw)
    except ValueError as exc:
        raise ValueError(f"{config_path}: {exc}") from exc
    return model, rope


class _WeightFiles:
    """Tensor name -> full tensor over one directory's weight files, opened on first use."""

    def __init__(self, path: str, stack: ExitStack) -> None:
        _require_dir(path, what="weights directory")
        self._stack = stack
        self._handles: dict[str, tuple[Any, set[str]]] = {}
        found = next((n for n in WEIGHT_FILE_NAMES if os.path.isfile(os.path.join(path, n))), None)
        if found is None:
            raise FileNotFoundError(f"{path} has no weights: looked for {', '.join(WEIGHT_FILE_NAMES)}")
        self.safetensors = found in (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME)
        self.source = os.path.join(path, found)
        # None: a single file, whose own key list is the map.
        self._weight_map: Optional[dict[str, str]] = None
        if found in (SAFETENSORS_INDEX_NAME, TORCH_INDEX_NAME):
            self._weight_map = self._read_index(path, self.source)
            # Every listed shard is checked now, so a broken download fails before any load.
            for file in sorted(set(self._weight_map.values())):
                if not os.path.isfile(file):
                    raise ValueError(f"{file} is listed in {self.source} but does not exist")
        else:
            self._open(self.source)

    @staticmethod
    def _read_index(path: str, index_path: str) -> dict[str, str]:
        weight_map = _load_json(index_path, what="weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index_path}: 'weight_map' must be an object of tensor name -> file name")
        return {name: os.path.join(path, file) for name, file in weight_map.items()}

    def _open(self, file: str) -> tuple[Any, set[str]]:
        """(handle, tensor names) of `file`, opened once."""
        if file in self._handles:
            return self._handles[file]
        if self.safetensors:
            from safetensors import safe_open

            try:
                handle = self._stack.enter_context(safe_open(file, framework="pt", device="cpu"))
            except Exception as exc:
                raise ValueError(f"{file}: not a readable safetensors file, it may be truncated or "
                                 f"corrupt ({exc})") from exc
            handle_keys = set(handle.keys())
        else:
            try:
                # mmap keeps the load lazy; weights_only refuses arbitrary pickled code.
                handle = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise ValueError(f"{file}: cannot be loaded as a PyTorch state dict, it may be "
                                 f"truncated, corrupt or in the pre-1.6 format ({exc})") from exc
            if not isinstance(handle, dict):
                raise ValueError(f"{file}: expected a state dict, got {type(handle).__name__}")
            handle_keys = set(handle)
        self._handles[file] = (handle, handle_keys)
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        if self._weight_map is None:
            file = self.source
        else:
            file = self._weight_map.get(name)
            if file is None:
                raise ValueError(f"tensor {name!r} is not in the weight_map of {self.source}")
        handle, keys = self._open(file)
        if name not in keys:
            raise ValueError(f"tensor {name!r} is not in {file}")
        if not self.safetensors:
            return handle[name]
        try:
            return handle.get_tensor(name)
        except Exception as exc:
            raise ValueError(f"{file}: cannot read tensor {name!r} ({exc})") from exc


@contextmanager
def open_hf_weights(path: str) -> Iterator[Callable[[str], torch.Tensor]]:
    """Yield `get(name) -> tensor`, the full tensor `name` (canonical name) in its stored dtype.

    Tensors are read one at a time on request (safetensors `safe_open`, or an mmap'ed
    `torch.load(weights_only=True)` for legacy `.bin` files), so memory holds what the caller
    keeps. Files are closed when the context exits. Missing files, shards or tensors and
    truncated files raise ValueError/FileNotFoundError naming the path and the tensor.
    """
    with ExitStack() as stack:
        files = _WeightFiles(path, stack)
        yield files.get


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def hf_config_dict(cfg: ModelConfig, rope: RopeConfig, *, dtype: torch.dtype,
                   token_ids: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """config.json contents that make transformers build the same model as `cfg` + `rope`;
    `token_ids`: its bos_token_id / eos_token_id / pad_token_id (null when not given)."""
    if "linear" in layer_kinds(cfg):
        raise ValueError(f"model.layer_pattern={cfg.layer_pattern!r} has linear-attention "
                         f"layers, which transformers' Llama cannot represent: keep the native "
                         f"checkpoint (longtrain-export format=native)")
    qwen2 = cfg.qkv_bias
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
    out: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        # Unknown ids stay explicit nulls: they stop transformers from filling in Llama's
        # defaults (1 and 2), which would be wrong for most vocabularies.
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        **(token_ids or {}),
        # transformers 5 reads `dtype`; 4.x reads `torch_dtype`.
        "dtype": _dtype_name(dtype),
        "torch_dtype": _dtype_name(dtype),
    }
    if qwen2:
        out.update({"use_sliding_window": False, "sliding_window": None,
                    "max_window_layers": cfg.num_layers,
                    "layer_types": ["full_attention"] * cfg.num_layers})
    else:
        out.update({"attention_bias": False, "mlp_bias": False})
    # Last: for dynamic NTK it overrides max_position_embeddings with the original length.
    out.update(rope_to_hf(rope, max_position_embeddings=cfg.max_position_embeddings))
    return out


class _ShardWriter:
    """Accumulates tensors into safetensors files of at most `max_shard_bytes` (a single
    tensor larger than that gets a file of its own), holding one shard in memory at a time."""

    def __init__(self, out_dir: str, *, max_shard_bytes: int) -> None:
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0
        self.dtype: Optional[torch.dtype] = None
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        if self.dtype is None:
            self.dtype = tensor.dtype
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        # Final names need the shard count, known only at the end; `finish` renames.
        file = os.path.join(self.out_dir, f"shard-{len(self.files)}.tmp")
        # transformers refuses safetensors files without format metadata.
        save_file(self._pending, file, metadata={"format": "pt"})
        self.files.append((file, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> None:
        if self._pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            os.rename(self.files[0][0], os.path.join(self.out_dir, SAFETENSORS_NAME))
            return
        n = len(self.files)
        weight_map: dict[str, str] = {}
        for i, (file, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(file, os.path.join(self.out_dir, final))
            weight_map.update((name, final) for name in names)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(os.path.join(self.out_dir, SAFETENSORS_INDEX_NAME), index)


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _commit_export(writer: _ShardWriter, cfg: ModelConfig, rope: RopeConfig, *, out_dir: str,
                   dtype: Optional[torch.dtype], inference: InferenceFiles,
                   overwrite: bool) -> None:
    """Finish the shards, write config.json and the inference files, and move the staged
    files into place (`longtrain.checkpoint.export_dir`)."""
    writer.finish()
    config = hf_config_dict(cfg, rope, dtype=dtype or writer.dtype or torch.float32,
                            token_ids=inference.token_ids)
    own_rope = config.get(LONGTRAIN_ROPE_KEY)
    if own_rope is not None:
        get_logger().warning(
            "export to %s: transformers does not scale attention queries (rope.scaling=%r), "
            "so it loads this model as plain RoPE with theta %g and its logits differ from "
            "ours at positions >= %d; longtrain reads the scaling back from config.json's %r",
            out_dir, rope.scaling, rope.theta, own_rope["original_max_position_embeddings"],
            LONGTRAIN_ROPE_KEY)
    _write_json(os.path.join(writer.out_dir, CONFIG_NAME), config)
    inference.write(writer.out_dir)
    commit_export_dir(writer.out_dir, out_dir, overwrite=overwrite)


def _agree_on_failure(failed: bool, *, tp_group, device: torch.device) -> bool:
    """True on every rank if any rank of the group failed (so all ranks raise together)."""
    import torch.distributed as dist

    if tp_group is None or not dist.is_initialized() or dist.get_world_size(tp_group) == 1:
        return failed
    flag = torch.tensor([1.0 if failed else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=tp_group)
    return bool(flag.item())


def export_hf(model: LlamaModel, rope: RopeConfig, out_dir: str, *, tp_group=None,
              is_writer: bool = True, dtype: Optional[torch.dtype] = None,
              max_shard_bytes: int = 2 * 1024**3, inference: Optional[InferenceFiles] = None,
              overwrite: bool = False) -> None:
    """Write `model` as a Hugging Face directory at `out_dir`: config.json, safetensors and
    the `inference` files (token ids, generation_config.json, tokenizer; none if not given).

    A collective over `tp_group`: every TP rank calls it and exactly one (`is_writer`) writes.
    Tensors are gathered one at a time and written in shards of at most `max_shard_bytes`
    (`model.safetensors`, or numbered shards + `model.safetensors.index.json`), cast to
    `dtype` if given. Files are staged in a hidden sibling and moved in when complete; in an
    existing `out_dir` only the files an export owns are replaced, and a directory that is
    neither empty nor an earlier export is refused unless `overwrite`
    (`longtrain.checkpoint.export_dir`). If the writer fails, every rank raises.
    """
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r} must be a positive integer")
    out_dir = os.path.abspath(out_dir)
    # Validates the rope on every rank before any collective, so a bad config fails everywhere.
    rope_to_hf(rope, max_position_embeddings=model.cfg.max_position_embeddings)
    device = next(model.parameters()).device

    error: Optional[BaseException] = None
    writer: Optional[_ShardWriter] = None
    if is_writer:
        try:
            writer = _ShardWriter(make_staging_dir(out_dir, overwrite=overwrite),
                                  max_shard_bytes=max_shard_bytes)
        except Exception as exc:
            error = exc

    committed = False
    try:
        # Every rank consumes the whole stream even after a local failure: each tensor is an
        # all-gather that the other ranks are waiting in.
        for name, tensor in iter_canonical(model, group=tp_group):
            if writer is None or error is not None:
                continue
            try:
                writer.add(name, tensor if dtype is None else tensor.to(dtype))
            except Exception as exc:
                error = exc
        if writer is not None and error is None:
            try:
                _commit_export(writer, model.cfg, rope, out_dir=out_dir, dtype=dtype,
                               inference=inference or InferenceFiles(), overwrite=overwrite)
                committed = True
            except Exception as exc:
                error = exc
    finally:
        # Also reached when the stream itself fails (a collective error): no staging
        # directory is ever left behind.
        if writer is not None and not committed and os.path.isdir(writer.out_dir):
            shutil.rmtree(writer.out_dir, ignore_errors=True)

    if _agree_on_failure(error is not None, tp_group=tp_group, device=device):
        if error is not None:
            raise error
        raise RuntimeError(f"export to {out_dir!r} failed on the writer rank")
    if is_writer:
        get_logger().info("exported %s (%.1f MB) to %s", model.cfg.name,
                          (writer.total_bytes if writer else 0) / 1e6, out_dir)


def write_hf(tensors: Iterable[tuple[str, torch.Tensor]], *, model: ModelConfig,
             rope: RopeConfig, out_dir: str, max_shard_bytes: int = 2 * 1024**3,
             inference: Optional[InferenceFiles] = None, overwrite: bool = False) -> None:
    """Write canonical (name, full tensor) pairs as a Hugging Face directory, in one process
    (the native -> Hugging Face conversion). Staged and moved into place like `export_hf`,
    with the same rules for an existing `out_dir`."""
    out_dir = os.path.abspath(out_dir)
    rope_to_hf(rope, max_position_embeddings=model.max_position_embeddings)
    writer = _ShardWriter(make_staging_dir(out_dir, overwrite=overwrite),
                          max_shard_bytes=max_shard_bytes)
    try:
        for name, tensor in tensors:
            writer.add(name, tensor)
        _commit_export(writer, model, rope, out_dir=out_dir, dtype=None,
                       inference=inference or InferenceFiles(), overwrite=overwrite)
    except BaseException:
        shutil.rmtree(writer.out_dir, ignore_errors=True)
        raise
