"""Tokenizers: the built-in byte tokenizer, or a Hugging Face tokenizer directory.

`load_tokenizer(spec)` is the one entry point: `"byte"` (ids 0-255 are UTF-8 bytes, then
BOS, EOS and PAD; needs no files, so tests and the embedded default run anywhere) or the path
of a directory `transformers.AutoTokenizer` reads (usually the checkpoint's), local files only.
Both expose encode / encode_batch / decode, bos_id / eos_id / pad_id and vocab_size.

`"auto"` (the default of `data.tokenizer`) is resolved against `init.from` before training
(`longtrain.planning.resolve.apply_init_from`); with no `init.from` it is the byte tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Optional, Protocol

BYTE = "byte"
AUTO = "auto"
# What `save_pretrained` of a tokenizer may write (slow and fast tokenizers alike).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json")
# Any of these makes a directory a tokenizer directory for AutoTokenizer.
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class Tokenizer(Protocol):
    bos_id: Optional[int]
    eos_id: Optional[int]
    pad_id: int
    declared_pad_id: Optional[int]
    vocab_size: int

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    bos_id = 256
    eos_id = 257
    pad_id = 258
    # the pad token the tokenizer itself defines (an export's pad_token_id)
    declared_pad_id: Optional[int] = 258
    vocab_size = 259

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    # every instance is the same tokenizer (per-tokenizer caches key on it)
    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)


class HFTokenizer:
    """A `transformers` tokenizer read from a local directory (no special tokens added by
    encode; BOS / EOS are placed by the caller)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.path = path
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.bos_id: Optional[int] = self._tok.bos_token_id
        self.eos_id: Optional[int] = self._tok.eos_token_id
        self.declared_pad_id: Optional[int] = self._tok.pad_token_id
        pad = self.declared_pad_id
        if pad is None:
            pad = self.eos_id if self.eos_id is not None else 0
        self.pad_id: int = pad
        # len() counts added tokens too: the model's embedding must cover every id.
        self.vocab_size: int = len(self._tok)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._tok(text, add_special_tokens=False)["input_ids"]
        head = [self.bos_id] if bos and self.bos_id is not None else []
        tail = [self.eos_id] if eos and self.eos_id is not None else []
        return head + list(ids) + tail

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def has_tokenizer(path: str) -> bool:
    """Whether the directory `path` holds a Hugging Face tokenizer."""
    return any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_MARKERS)


def without_source(spec: str) -> str:
    """`spec` as `load_tokenizer` reads it: "auto" that nothing resolved (no init.from) is
    the byte tokenizer."""
    return BYTE if spec == AUTO else spec


def tokenizer_problems(spec: str) -> list[str]:
    """Static problems of `data.tokenizer` (nothing is loaded)."""
    if without_source(spec) == BYTE:
        return []
    if not os.path.isdir(spec):
        return [f"data.tokenizer={spec!r} is neither 'auto', 'byte' nor a directory (a "
                f"Hugging Face tokenizer directory, usually the checkpoint's)"]
    return []


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether every id means the same token in `a` and `b`."""
    if a.vocab_size != b.vocab_size:
        return False
    if isinstance(a, HFTokenizer) and isinstance(b, HFTokenizer):
        return a._tok.get_vocab() == b._tok.get_vocab()
    return isinstance(a, ByteTokenizer) and isinstance(b, ByteTokenizer)


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str) -> Tokenizer:
    """`"byte"` or a Hugging Face tokenizer directory (cached per process)."""
    if without_source(spec) == BYTE:
        return ByteTokenizer()
    found = tokenizer_problems(spec)
    if found:
        raise ValueError(found[0])
    try:
        return HFTokenizer(spec)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"data.tokenizer={spec!r}: cannot load a Hugging Face tokenizer from "
                         f"this directory ({type(exc).__name__}: {exc})") from exc


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf", ".ckpt")


def tokenizer_fingerprint(spec: str) -> str:
    """Identity of a tokenizer for cache keys: the contents of a directory's non-weight
    files (so a changed vocabulary invalidates every tokenized cache)."""
    if without_source(spec) == BYTE:
        return "byte-v1"
    digest = hashlib.sha256()
    for name in sorted(os.listdir(spec)):
        full = os.path.join(spec, name)
        if not os.path.isfile(full) or name.endswith(_WEIGHT_SUFFIXES) or name.startswith("."):
            continue
        digest.update(name.encode())
        with open(full, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
