"""Corpora through Hugging Face `datasets`: local files (`data=files`) or a dataset name
(`data=hf`), each checked with a message naming the file or dataset and the field.

Local files: `data.path` is a file, a directory (searched recursively, hidden entries
skipped) or a glob. `.jsonl` / `.json` / `.ndjson` / `.parquet` hold records whose
`data.text_field` is a document; `.txt` / `.text` / `.md` files are one document each;
`.gz` / `.zst` / `.bz2` / `.xz` compressed JSON and text files are read too. Record files come
first in path order, then the plain-text documents in path order.

Domains (for the length-upsampling mixture): `data.domain_field` when set; otherwise a record
file is its own domain and a plain-text document belongs to its folder (relative to
`data.path`). A hub dataset without a domain field is one domain.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from longtrain.config.errors import ConfigError
from longtrain.config.schema import DataConfig
from longtrain.observability.log import get_logger

_FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet",
            ".txt": "text", ".text": "text", ".md": "text"}
_COMPRESSED = (".gz", ".zst", ".bz2", ".xz")
SUPPORTED = "jsonl, json, ndjson, parquet, txt, text, md (json and text also compressed: " \
            "gz, zst, bz2, xz)"


def refuse(message: str) -> ConfigError:
    return ConfigError([message])


@dataclass(frozen=True)
class DataFile:
    path: str
    # datasets builder: json | parquet | text
    fmt: str
    domain: str


def _format_of(path: str) -> Optional[str]:
    name = path.lower()
    for suffix in _COMPRESSED:
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            fmt = _FORMATS.get(os.path.splitext(name)[1])
            return fmt if fmt in ("json", "text") else None
    return _FORMATS.get(os.path.splitext(name)[1])


def _domain(path: str, fmt: str, base: str) -> str:
    rel = os.path.relpath(path, base) if base else os.path.basename(path)
    return (os.path.dirname(rel) or ".") if fmt == "text" else rel


def resolve_files(path: str) -> list[DataFile]:
    """The data files of `data.path`, sorted, with their format and domain."""
    if any(ch in path for ch in "*?["):
        base = path.split("*")[0].split("?")[0].split("[")[0]
        base = base if base.endswith(os.sep) else os.path.dirname(base)
        found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not found:
            raise refuse(f"data.path={path!r} matches no files")
    elif os.path.isfile(path):
        fmt = _format_of(path)
        if fmt is None:
            raise refuse(f"data.path={path!r}: unsupported file type (supported: {SUPPORTED})")
        return [DataFile(path, fmt, _domain(path, fmt, ""))]
    elif os.path.isdir(path):
        base, found = path, []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(root, f) for f in files if not f.startswith(".")]
        found.sort()
    else:
        raise refuse(f"data.path={path!r} does not exist")
    out = [DataFile(p, fmt, _domain(p, fmt, base)) for p in found
           if (fmt := _format_of(p)) is not None]
    skipped = len(found) - len(out)
    if not out:
        raise refuse(f"data.path={path!r} contains no data files (supported: {SUPPORTED})")
    if skipped:
        get_logger().warning("data.path=%s: skipped %d file(s) of unsupported types", path, skipped)
    return out


def _hf_cache(cache_dir: str) -> str:
    return os.path.join(cache_dir, "hf")


def _sanitized_copy(path: str, cache_dir: str) -> tuple[str, int]:
    """A UTF-8 copy of an (uncompressed) JSON file with every byte that is not UTF-8 replaced
    by U+FFFD, and how many bytes were replaced."""
    stat = os.stat(path)
    digest = hashlib.sha256(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    out_dir = os.path.join(cache_dir, "utf8")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, digest.hexdigest()[:16] + ".json")
    with open(path, "rb") as f:
        # undecodable bytes become lone surrogates U+DC80..U+DCFF: count, then replace them
        text = f.read().decode("utf-8", errors="surrogateescape")
    text, replaced = re.subn("[\udc80-\udcff]", "\ufffd", text)
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, out)
    return out, replaced


def _check_fields(ds: Any, where: str, d: DataConfig) -> None:
    columns = list(ds.column_names)
    for name, option in ((d.text_field, "data.text_field"), (d.domain_field, "data.domain_field")):
        if name is None:
            continue
        if name not in columns:
            raise refuse(f"{where}: records have no field {name!r} ({option}); fields present: "
                         f"{columns}")
        dtype = getattr(ds.features[name], "dtype", None)
        if name == d.text_field and dtype not in ("string", "large_string"):
            raise refuse(f"{where}: field {name!r} ({option}) holds {ds.features[name]}, "
                         f"not text")


def _unicode_error(exc: Optional[BaseException]) -> bool:
    """Whether a reader failed on bytes that are not UTF-8 (Python's codec, ujson and
    pyarrow each say so differently)."""
    while exc is not None:
        if isinstance(exc, UnicodeDecodeError) or re.search(r"utf-?8|invalid encoding", str(exc),
                                                            re.IGNORECASE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _read(fmt: str, path: str, shown: str, cache_dir: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(fmt, data_files=[path], split="train",
                                     cache_dir=_hf_cache(cache_dir))
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes a message naming the file
        if _unicode_error(exc):
            raise
        cause = exc.__cause__ or exc
        raise refuse(f"data.path: cannot read {shown} as {fmt} "
                     f"({type(cause).__name__}: {cause})") from exc


def _load_records(f: DataFile, d: DataConfig, cache_dir: str) -> Any:
    try:
        ds = _read(f.fmt, f.path, f.path, cache_dir)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        if f.fmt != "json" or not _unicode_error(exc) or f.path.lower().endswith(_COMPRESSED):
            raise refuse(f"data.path: cannot read {f.path} as {f.fmt} "
                         f"({type(exc).__name__}: {exc})") from exc
        # Invalid UTF-8 is not fatal: read a copy with the bad bytes replaced.
        clean, replaced = _sanitized_copy(f.path, cache_dir)
        get_logger().warning("%s: %d byte(s) that are not UTF-8 replaced with U+FFFD",
                             f.path, replaced)
        ds = _read("json", clean, f.path, cache_dir)
    _check_fields(ds, f.path, d)
    keep = [d.text_field] + ([d.domain_field] if d.domain_field else [])
    ds = ds.select_columns(keep)
    if _invalid_utf8(ds, d.text_field):
        get_logger().warning("%s: field %r holds bytes that are not UTF-8; they are replaced "
                             "with U+FFFD", f.path, d.text_field)
        ds = _repair_utf8(ds, d.text_field)
    return ds


def _invalid_utf8(ds: Any, field: str) -> bool:
    import pyarrow as pa

    for chunk in ds.data.table.column(field).chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            return True
    return False


class _DecodeReplace:
    """`datasets.map` function: bytes -> text, invalid UTF-8 replaced with U+FFFD."""

    def __init__(self, field: str) -> None:
        self.field = field

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        return {self.field: [None if b is None else b.decode("utf-8", errors="replace")
                             for b in batch[self.field]]}


def _repair_utf8(ds: Any, field: str) -> Any:
    import datasets

    raw = ds.cast_column(field, datasets.Value("binary"))
    features = raw.features.copy()
    features[field] = datasets.Value("string")
    fingerprint = hashlib.sha256(f"utf8-repair:{ds._fingerprint}:{field}".encode()).hexdigest()[:16]
    return raw.map(_DecodeReplace(field), batched=True, features=features,
                   new_fingerprint=fingerprint, desc="replacing bytes that are not UTF-8")


def _load_text_files(files: list[DataFile], d: DataConfig, cache_dir: str) -> Any:
    """Plain-text files, one document each, in the order given."""
    import datasets

    try:
        ds = datasets.load_dataset("text", data_files=[f.path for f in files], split="train",
                                   sample_by="document", encoding_errors="replace",
                                   cache_dir=_hf_cache(cache_dir))
    except Exception as exc:  # noqa: BLE001
        cause = exc.__cause__ or exc
        raise refuse(f"data.path: cannot read the text files under it "
                     f"({type(cause).__name__}: {cause})") from exc
    if ds.num_rows != len(files):
        raise refuse(f"data.path: read {ds.num_rows} documents from {len(files)} text files")
    if d.text_field != "text":
        ds = ds.rename_column("text", d.text_field)
    return ds


@dataclass
class Corpus:
    """A map-style dataset with the text column (and the domain column when
    `data.domain_field` is set), the domain of each row, and a fingerprint of the sources."""

    dataset: Any
    # consecutive rows per domain: (index into `domains`, rows), in row order (None: the
    # domain_field column names each row's domain)
    domain_runs: Optional[list[tuple[int, int]]]
    domains: list[str]
    fingerprint: str
    describe: str


def load_corpus(d: DataConfig, cache_dir: str) -> Corpus:
    """Load `data.path` (files) or `data.name` (hf) as one map-style dataset."""
    import datasets

    if d.source == "hf":
        return _load_hub(d, cache_dir)
    files = resolve_files(str(d.path))
    log = get_logger()
    parts: list[Any] = []
    domains: list[str] = []
    # (domain index, rows) for each part in order
    runs: list[tuple[int, int]] = []

    def domain_index(name: str) -> int:
        if name not in domains:
            domains.append(name)
        return domains.index(name)

    empty_files = [f.path for f in files if f.fmt != "text" and os.path.getsize(f.path) == 0]
    if empty_files:
        log.warning("data.path: skipped %d empty file(s), e.g. %s", len(empty_files),
                    empty_files[0])
    text = [f for f in files if f.fmt == "text"]
    for f in files:
        if f.fmt == "text" or f.path in empty_files:
            continue
        ds = _load_records(f, d, cache_dir)
        if ds.num_rows:
            parts.append(ds)
            runs.append((domain_index(f.domain), ds.num_rows))
    if text:
        if d.domain_field:
            raise refuse(f"data.domain_field={d.domain_field!r} cannot apply to plain-text "
                         f"files (e.g. {text[0].path}); their folder is their domain")
        ds = _load_text_files(text, d, cache_dir)
        parts.append(ds)
        runs += [(domain_index(f.domain), 1) for f in text]
    if not parts:
        raise refuse(f"data.path={d.path!r} holds no records")
    for i, ds in enumerate(parts):
        # a text column may be string in one file and large_string in another
        if ds.features[d.text_field] != parts[0].features[d.text_field]:
            parts[i] = ds.cast_column(d.text_field, parts[0].features[d.text_field])
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    digest = hashlib.sha256("|".join(p._fingerprint for p in parts).encode()).hexdigest()[:16]
    return Corpus(dataset, None if d.domain_field else runs, domains, digest,
                  f"data.path={d.path!r} ({len(files)} file(s))")


def _load_hub(d: DataConfig, cache_dir: str) -> Corpus:
    import datasets

    where = f"data.name={d.name!r}" + (f" (subset {d.subset!r})" if d.subset else "")
    try:
        ds = datasets.load_dataset(str(d.name), d.subset, split=d.split,
                                   cache_dir=_hf_cache(cache_dir), num_proc=d.num_proc)
    except Exception as exc:  # noqa: BLE001
        raise refuse(f"{where} split {d.split!r}: cannot load "
                     f"({type(exc).__name__}: {exc})") from exc
    _check_fields(ds, where, d)
    ds = ds.select_columns([d.text_field] + ([d.domain_field] if d.domain_field else []))
    runs = None if d.domain_field else [(0, ds.num_rows)]
    return Corpus(ds, runs, [str(d.name)], ds._fingerprint, where)


def open_stream(d: DataConfig) -> Any:
    """The hub dataset as an `IterableDataset` (data.streaming=true)."""
    import datasets

    where = f"data.name={d.name!r}"
    try:
        return datasets.load_dataset(str(d.name), d.subset, split=d.split, streaming=True)
    except Exception as exc:  # noqa: BLE001
        raise refuse(f"{where} split {d.split!r}: cannot open as a stream "
                     f"({type(exc).__name__}: {exc})") from exc


def check_stream(d: DataConfig) -> None:
    """Driver-side check of a stream: it opens and its first record has the text field."""
    stream = open_stream(d)
    first = next(iter(stream), None)
    if first is None:
        raise refuse(f"data.name={d.name!r} split {d.split!r} is empty")
    for name, option in ((d.text_field, "data.text_field"), (d.domain_field, "data.domain_field")):
        if name is not None and name not in first:
            raise refuse(f"data.name={d.name!r}: records have no field {name!r} ({option}); "
                         f"fields present: {sorted(first)}")
