"""What makes an export usable for inference as-is, besides its weights and architecture: the
token ids in config.json, a generation_config.json (where `generate()` finds its EOS) and the
tokenizer files.

They follow the tokenizer the model was trained with (`data.tokenizer`, resolved):
- a Hugging Face tokenizer directory (usually `init.from`'s model directory): its tokenizer
  files are copied; its config.json's bos/eos/pad ids and its generation_config.json are
  carried over unchanged when it has them, else they are derived from the tokenizer;
- the byte tokenizer: its BOS/EOS/PAD ids (no tokenizer files: AutoTokenizer cannot read it);
- unknown (a native checkpoint saved before checkpoints recorded their tokenizer): the
  ids and generation config of `model_dir` when given, else null ids.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Optional

from longtrain.data.tokenizer import BYTE, TOKENIZER_FILES, load_tokenizer, without_source
from longtrain.observability.log import get_logger

__all__ = ["GENERATION_CONFIG_NAME", "InferenceFiles", "inference_files"]

GENERATION_CONFIG_NAME = "generation_config.json"
_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class InferenceFiles:
    # bos_token_id / eos_token_id / pad_token_id of config.json (None: JSON null)
    token_ids: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(_ID_KEYS))
    # generation_config.json's contents; empty: none is written
    generation_config: dict[str, Any] = field(default_factory=dict)
    # tokenizer files copied into the export, from this directory
    tokenizer_dir: Optional[str] = None

    def tokenizer_files(self) -> list[str]:
        if self.tokenizer_dir is None:
            return []
        return [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(self.tokenizer_dir, n))]

    def write(self, directory: str) -> None:
        """Write generation_config.json and copy the tokenizer files into `directory`."""
        if self.generation_config:
            with open(os.path.join(directory, GENERATION_CONFIG_NAME), "w", encoding="utf-8") as f:
                json.dump(self.generation_config, f, indent=2, sort_keys=True)
                f.write("\n")
        for name in self.tokenizer_files():
            # copyfile, not copy2: the source's (possibly private) permissions stay behind
            shutil.copyfile(os.path.join(self.tokenizer_dir, name), os.path.join(directory, name))


def _json_object(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        get_logger().warning("export: ignoring unreadable %s (%s)", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _from_model_dir(path: str, fallback: dict[str, Any]) -> InferenceFiles:
    config = _json_object(os.path.join(path, "config.json"))
    ids = {k: config[k] if config.get(k) is not None else fallback.get(k) for k in _ID_KEYS}
    generation = _json_object(os.path.join(path, GENERATION_CONFIG_NAME))
    if not generation:
        generation = {k: v for k, v in ids.items() if v is not None}
    return InferenceFiles(token_ids=ids, generation_config=generation)


def inference_files(tokenizer: Optional[str], *, model_dir: Optional[str] = None) -> InferenceFiles:
    """The inference files of a model trained with `tokenizer` (a `data.tokenizer` value, or
    None when unknown); `model_dir`: a Hugging Face directory whose ids and generation config
    stand in when the tokenizer is unknown."""
    if tokenizer is None:
        if model_dir is not None:
            return _from_model_dir(model_dir, {})
        get_logger().warning("export: the model's tokenizer is unknown, so config.json gets null "
                             "token ids and no generation_config.json or tokenizer is written "
                             "(longtrain-export tokenizer=<dir> names it)")
        return InferenceFiles()
    spec = without_source(tokenizer)
    try:
        tok = load_tokenizer(spec)
    except ValueError as exc:
        # at the end of a run: an export without the ids beats losing the export
        get_logger().warning("export: %s; its token ids are taken from its config.json only", exc)
        own: dict[str, Any] = {}
    else:
        own = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
               "pad_token_id": tok.declared_pad_id}
    if spec == BYTE:
        return InferenceFiles(token_ids=own, generation_config=dict(own))
    if not os.path.isdir(spec):
        return InferenceFiles()
    found = _from_model_dir(spec, own)
    return InferenceFiles(token_ids=found.token_ids, generation_config=found.generation_config,
                          tokenizer_dir=os.path.abspath(spec))
