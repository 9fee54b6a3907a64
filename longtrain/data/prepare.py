"""Driver-side data preparation, before any worker starts: load and check the corpus,
tokenize with `datasets.map` (several processes, cached by fingerprint), drop empty
documents, apply the length-upsampling mixture, shuffle documents with the seed, and pack
everything into a flat token array written once (see `packed.py` for the layout).

The packed directory is `<cache_dir>/packed/<key>`, key = a hash of the source fingerprint
(datasets' fingerprint of every file: path, size, modification time), the tokenizer's files,
the text / domain fields, BOS / EOS, shuffle, seed and upsampling. It does not depend on
seq_len, so a run at another length reuses it. Writes go to a temporary directory renamed
into place, so concurrent preparations of the same corpus are safe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Optional

import numpy as np

from longtrain.config.schema import DataConfig, RunConfig
from longtrain.data.packed import META, PackedCorpus
from longtrain.data.sources import Corpus, check_stream, load_corpus, refuse
from longtrain.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from longtrain.data.upsample import upsample_counts
from longtrain.observability.log import get_logger

PACK_VERSION = 1
# tokens per gather when writing the packed array (bounds the driver's extra memory)
_CHUNK_TOKENS = 1 << 23


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "longtrain", "data")


def cache_dir_of(d: DataConfig) -> str:
    return os.path.abspath(os.path.expanduser(d.cache_dir)) if d.cache_dir else default_cache_dir()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


class _Encode:
    """The `datasets.map` function: token ids (no BOS/EOS) of each document, the number of
    U+FFFD replacement characters in it, and its domain. Picklable: each process loads the
    tokenizer itself."""

    def __init__(self, *, tokenizer: str, text_field: str, domain_field: Optional[str]) -> None:
        self.tokenizer, self.text_field, self.domain_field = tokenizer, text_field, domain_field

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        tok = load_tokenizer(self.tokenizer)
        # None (a record without a value) and whitespace-only text are empty documents
        texts = [t if t is not None and t.strip() else "" for t in batch[self.text_field]]
        ids = tok.encode_batch(texts) if any(texts) else [[] for _ in texts]
        out: dict[str, list] = {"input_ids": ids, "replaced": [t.count("\ufffd") for t in texts]}
        if self.domain_field:
            out["domain"] = [str(v) for v in batch[self.domain_field]]
        return out


def _num_proc(d: DataConfig, rows: int) -> int:
    if d.num_proc is not None:
        return max(1, min(d.num_proc, rows))
    # a process pool costs about a second to start: not worth it for a small corpus
    return max(1, min(8, os.cpu_count() or 1, rows // 20_000))


def tokenize(corpus: Corpus, d: DataConfig) -> Any:
    """The corpus as token ids: columns input_ids (int32 lists), replaced (and domain)."""
    import datasets

    fingerprint = _digest(["tokenize", 1, corpus.fingerprint, tokenizer_fingerprint(d.tokenizer),
                           d.text_field, d.domain_field])
    list_type = getattr(datasets, "List", None) or datasets.Sequence
    features = {"input_ids": list_type(datasets.Value("int32")),
                "replaced": datasets.Value("int32")}
    if d.domain_field:
        features["domain"] = datasets.Value("string")
    ds = corpus.dataset
    num_proc = _num_proc(d, ds.num_rows)
    if num_proc > 1:
        # forked tokenizer processes: the Rust tokenizer's own threads would warn and idle
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return ds.map(_Encode(tokenizer=d.tokenizer, text_field=d.text_field,
                          domain_field=d.domain_field),
                  batched=True, batch_size=1000, num_proc=num_proc if num_proc > 1 else None,
                  remove_columns=list(ds.column_names), features=datasets.Features(features),
                  new_fingerprint=fingerprint, desc="tokenizing")


def _row_domains(tokenized: Any, corpus: Corpus) -> tuple[np.ndarray, list[str]]:
    if corpus.domain_runs is None:
        names, inverse = np.unique(np.asarray(tokenized.data.table.column("domain").to_pylist()),
                                   return_inverse=True)
        return inverse.astype(np.int64), [str(n) for n in names]
    index = np.repeat([r[0] for r in corpus.domain_runs], [r[1] for r in corpus.domain_runs])
    return index.astype(np.int64), corpus.domains


def _write_source_order(ids_column: Any, path: str, dtype: np.dtype, total: int) -> np.ndarray:
    """Every document's tokens in row order, as one memory-mapped array."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(max(total, 1),))
    pos = 0
    for chunk in ids_column.chunks:
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        out[pos:pos + len(values)] = values
        pos += len(values)
    assert pos == total, (pos, total)
    return out


def _gather(tokens: np.ndarray, source: np.ndarray, src_offsets: np.ndarray, order: np.ndarray,
            lengths: np.ndarray, *, bos: Optional[int], eos: Optional[int]) -> np.ndarray:
    """Write documents `order` (each [BOS] tokens [EOS]) back to back into `tokens`; returns
    the start offset of every written document."""
    nb, ne = int(bos is not None), int(eos is not None)
    out_len = lengths[order] + nb + ne
    ends = np.cumsum(out_len)
    starts = ends - out_len
    k0 = 0
    while k0 < len(order):
        k1 = max(k0 + 1, int(np.searchsorted(ends, starts[k0] + _CHUNK_TOKENS, side="right")))
        lens, o0 = out_len[k0:k1], int(starts[k0])
        total = int(lens.sum())
        local_starts = starts[k0:k1] - o0
        rel = np.arange(total, dtype=np.int64) - np.repeat(local_starts, lens)
        src = np.repeat(src_offsets[order[k0:k1]], lens) + rel - nb
        buf = source[np.clip(src, 0, len(source) - 1)]
        if nb:
            buf[local_starts] = bos
        if ne:
            buf[local_starts + lens - 1] = eos
        tokens[o0:o0 + total] = buf
        k0 = k1
    return starts


def pack(tokenized: Any, corpus: Corpus, d: DataConfig, out_dir: str, *, key: str) -> dict:
    """Write the packed corpus of `tokenized` to `out_dir` (which must not exist yet)."""
    import pyarrow.compute as pc

    log = get_logger()
    tok = load_tokenizer(d.tokenizer)
    table = tokenized.data.table
    ids_column = table.column("input_ids")
    lengths = pc.list_value_length(ids_column).to_numpy(zero_copy_only=False).astype(np.int64)
    replaced = table.column("replaced").to_numpy().astype(np.int64)
    domains, names = _row_domains(tokenized, corpus)
    rows = len(lengths)
    keep = lengths > 0
    if not keep.any():
        raise refuse(f"{corpus.describe}: every document in field {d.text_field!r} "
                     f"(data.text_field) is empty")
    bos = tok.bos_id if d.add_bos else None
    eos = tok.eos_id if d.add_eos else None
    for wanted, token, what in ((d.add_bos, tok.bos_id, "BOS"), (d.add_eos, tok.eos_id, "EOS")):
        if wanted and token is None:
            log.warning("data.tokenizer=%s has no %s token: documents are packed without one",
                        d.tokenizer, what)
    full = lengths + int(bos is not None) + int(eos is not None)
    counts = np.zeros(rows, dtype=np.int64)
    counts[keep] = upsample_counts(domains[keep], lengths[keep], full[keep],
                                   threshold=d.upsample_threshold, factor=d.upsample_factor,
                                   seed=d.seed)
    order = np.repeat(np.arange(rows, dtype=np.int64), counts)
    if d.shuffle:
        order = order[np.random.default_rng([d.seed, 0xD0C5]).permutation(len(order))]
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    os.makedirs(out_dir)
    source = _write_source_order(ids_column, os.path.join(out_dir, "source.npy"), dtype,
                                 int(lengths.sum()))
    n_tokens = int(full[order].sum())
    tokens = np.lib.format.open_memmap(os.path.join(out_dir, "tokens.npy"), mode="w+",
                                       dtype=dtype, shape=(n_tokens,))
    starts = _gather(tokens, source, np.concatenate([[0], np.cumsum(lengths)[:-1]]), order,
                     lengths, bos=bos, eos=eos)
    tokens.flush()
    del tokens, source
    os.remove(os.path.join(out_dir, "source.npy"))
    np.save(os.path.join(out_dir, "doc_starts.npy"), starts.astype(np.int64))
    np.save(os.path.join(out_dir, "doc_index.npy"), order)
    long = lengths > d.upsample_threshold if d.upsample_threshold > 0 else np.zeros(rows, bool)
    domain_stats = []
    for i, name in enumerate(names):
        in_d = (domains == i) & keep
        domain_stats.append({
            "name": name, "docs": int(in_d.sum()),
            "tokens": int(full[in_d].sum()), "tokens_packed": int((full * counts)[in_d].sum()),
            "long_tokens": int(full[in_d & long].sum()),
            "long_tokens_packed": int((full * counts)[in_d & long].sum()),
        })
    meta = {
        "version": PACK_VERSION, "key": key, "source": corpus.describe,
        "n_tokens": n_tokens, "n_docs": int(len(order)), "dtype": dtype.name,
        "tokenizer": d.tokenizer, "vocab_size": tok.vocab_size, "bos_id": bos, "eos_id": eos,
        "pad_id": tok.pad_id, "text_field": d.text_field, "seed": d.seed, "shuffle": d.shuffle,
        "upsample_threshold": d.upsample_threshold, "upsample_factor": d.upsample_factor,
        "rows": rows, "empty_docs": int(rows - keep.sum()),
        "docs_with_replacement_chars": int((replaced > 0).sum()),
        "replacement_chars": int(replaced.sum()),
        "domains": domain_stats,
    }
    with open(os.path.join(out_dir, META), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def pack_corpus(d: DataConfig) -> str:
    """Load, tokenize and pack `d`'s corpus (or find it in the cache); returns its directory."""
    log = get_logger()
    cache_dir = cache_dir_of(d)
    os.makedirs(cache_dir, exist_ok=True)
    corpus = load_corpus(d, cache_dir)
    tokenized = tokenize(corpus, d)
    key = _digest(["pack", PACK_VERSION, tokenized._fingerprint, d.domain_field,
                   d.add_bos, d.add_eos, d.shuffle, d.seed, d.upsample_threshold,
                   d.upsample_factor])
    final = os.path.join(cache_dir, "packed", key)
    if os.path.isfile(os.path.join(final, META)):
        log.info("%s: packed corpus found in the cache: %s", corpus.describe, final)
    else:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=os.path.dirname(final))
        os.rmdir(tmp)
        try:
            pack(tokenized, corpus, d, tmp, key=key)
            try:
                os.rename(tmp, final)
            except OSError:
                # another process packed the same corpus first: theirs is identical
                if not os.path.isfile(os.path.join(final, META)):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(final, META)) as f:
        meta = json.load(f)
    if meta["empty_docs"]:
        log.warning("%s: dropped %d empty document(s) (no text in field %r)", corpus.describe,
                    meta["empty_docs"], d.text_field)
    if meta["replacement_chars"]:
        log.warning("%s: %d document(s) hold %d U+FFFD replacement character(s) (bytes that "
                    "are not UTF-8 were replaced)", corpus.describe,
                    meta["docs_with_replacement_chars"], meta["replacement_chars"])
    log.info("%s: %d documents, %d tokens packed in %s", corpus.describe, meta["n_docs"],
             meta["n_tokens"], final)
    return final


def prepare_data(cfg: RunConfig) -> RunConfig:
    """The run config with its corpus ready for the workers (`data.packed` set for packed
    sources); raises ConfigError naming the file / dataset and field on bad data."""
    d = cfg.data
    if d.source == "synthetic":
        return cfg
    if d.streaming:
        check_stream(d)
        return cfg
    path = pack_corpus(d)
    corpus = PackedCorpus(path)
    if corpus.num_sequences(d.seq_len) < 1:
        where = f"data.path={d.path!r}" if d.source == "files" else f"data.name={d.name!r}"
        raise refuse(f"{where} has {corpus.n_tokens} tokens after "
                     f"tokenization, fewer than data.seq_len + 1 = {d.seq_len + 1}")
    return dataclasses.replace(cfg, data=dataclasses.replace(d, packed=path))


def describe_data(cfg: RunConfig) -> Optional[str]:
    """One line about a prepared corpus (None for synthetic data and streams)."""
    d = cfg.data
    if d.packed is None:
        return None
    corpus = PackedCorpus(d.packed)
    n = corpus.num_sequences(d.seq_len)
    epochs = cfg.train.steps * d.batch_size / n
    split = 0
    block = 1 << 22
    for lo in range(0, len(corpus.doc_starts), block):
        ends = np.append(corpus.doc_starts[lo + 1:lo + block + 1], corpus.n_tokens)[:block]
        split += int((ends - corpus.doc_starts[lo:lo + block] > d.seq_len + 1).sum())
    meta = corpus.meta
    where = f"data.path={d.path!r}" if d.source == "files" else f"data.name={d.name!r}"
    return (f"{where}: {meta['n_docs']} documents, {corpus.n_tokens} tokens, {n} "
            f"sequences of {d.seq_len} ({epochs:.2f} epochs in {cfg.train.steps} steps); "
            f"{split} documents longer than data.seq_len (split), {meta['empty_docs']} empty "
            f"dropped")
