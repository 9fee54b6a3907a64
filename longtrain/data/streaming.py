"""Streaming corpora (`data=hf data.streaming=true`): sequential, not random access.

The stream is the same flat token stream a packed corpus holds ([BOS] doc [EOS] back to back,
documents in the order of a seeded shuffle buffer; epoch e reshuffles with seed + e), and global
sequence i is stream[i * seq_len : i * seq_len + seq_len + 1]. Every rank reads the whole
stream and keeps its own sequences, so DP x CP sharding is the same as for packed data. A
resume at step k re-reads and skips the first k * batch_size sequences (the position is still
(seed, step); the cost of reaching it grows with k). Upsampling needs the whole corpus and is
not available here.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

import numpy as np
import torch

from longtrain.config.schema import DataConfig
from longtrain.data.sources import open_stream
from longtrain.data.tokenizer import load_tokenizer

# documents tokenized per call of the tokenizer
_BATCH = 64


class StreamCursor:
    """Global sequences of a stream, served in increasing index order (a smaller index
    restarts the stream from the beginning). Held by its reader (the training data iterator,
    an eval pass), which passes it to `loader.global_batch`."""

    def __init__(self, d: DataConfig) -> None:
        self.cfg = d
        self._lock = threading.Lock()
        self._restart()

    def _restart(self) -> None:
        self._docs = self._documents()
        # the buffered stream starts at token offset `_base`
        self._base = 0
        self._buf = np.zeros(0, dtype=np.int64)
        self._starts: list[int] = []

    def _documents(self) -> Iterator[list[int]]:
        d = self.cfg
        tok = load_tokenizer(d.tokenizer)
        head = [tok.bos_id] if d.add_bos and tok.bos_id is not None else []
        tail = [tok.eos_id] if d.add_eos and tok.eos_id is not None else []
        epoch = 0
        while True:
            stream: Any = open_stream(d)
            if d.shuffle:
                stream = stream.shuffle(seed=d.seed, buffer_size=d.shuffle_buffer)
                stream.set_epoch(epoch)
            seen = 0
            batch: list[str] = []
            for record in stream:
                if d.text_field not in record:
                    raise ValueError(f"data.name={d.name!r}: a record has no field "
                                     f"{d.text_field!r} (data.text_field); fields present: "
                                     f"{sorted(record)}")
                text = record[d.text_field]
                if text is not None and text.strip():
                    batch.append(text)
                if len(batch) == _BATCH:
                    seen += len(batch)
                    yield from (head + ids + tail for ids in tok.encode_batch(batch))
                    batch = []
            if batch:
                seen += len(batch)
                yield from (head + ids + tail for ids in tok.encode_batch(batch))
            if seen == 0:
                raise ValueError(f"data.name={d.name!r} split {d.split!r}: no non-empty "
                                 f"documents in field {d.text_field!r}")
            epoch += 1

    def _advance(self, a: int, end: int) -> None:
        """Drop the stream before token offset `a`; buffer it up to `end` (exclusive). Skipped
        documents are read and discarded without being kept."""
        if a > self._base:
            drop = min(a - self._base, len(self._buf))
            self._buf = self._buf[drop:]
            self._base += drop
        pieces = [self._buf]
        have = self._base + len(self._buf)
        while have < end:
            ids = np.asarray(next(self._docs), dtype=np.int64)
            self._starts.append(have)
            # tokens of this document before `a` (only while nothing is buffered yet)
            cut = min(len(ids), max(0, a - have))
            if cut:
                self._base = have + cut
            pieces.append(ids[cut:])
            have += len(ids)
        self._buf = np.concatenate(pieces)
        first = next((k for k, x in enumerate(self._starts) if x > a), len(self._starts))
        self._starts = self._starts[max(0, first - 1):]

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and document ids of global sequence `index`, [seq_len + 1] int64."""
        s = self.cfg.seq_len
        a = index * s
        if a < self._base:
            self._restart()
        self._advance(a, a + s + 1)
        ids = self._buf[a - self._base:a - self._base + s + 1].copy()
        starts = np.asarray(self._starts, dtype=np.int64)
        docs = np.zeros(s + 1, dtype=np.int64)
        docs[starts[(starts > a) & (starts <= a + s)] - a] = 1
        return ids, np.cumsum(docs)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            rows = [self.sequence(i) for i in indices]
        return (torch.from_numpy(np.stack([r[0] for r in rows])),
                torch.from_numpy(np.stack([r[1] for r in rows])))

