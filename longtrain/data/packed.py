"""A packed corpus on disk, memory-mapped by every rank: global sequence i is a fixed slice.

Directory layout (written once by `longtrain.data.prepare`):

    tokens.npy      [n_tokens] uint16 | uint32   documents back to back, each [BOS] ... [EOS]
    doc_starts.npy  [n_docs] int64               offset of every document in tokens
    doc_index.npy   [n_docs] int64               the source row each packed document came from
    meta.json                                    counts, tokenizer ids, domain shares, key

With n = (n_tokens - 1) // seq_len sequences per epoch, global sequence i of epoch
e = i // n is tokens[j * seq_len : j * seq_len + seq_len + 1] with j = i % n in epoch 0 and
j = perm_e(i % n) afterwards (a permutation seeded with (data.seed, e)). Consecutive sequences
share one token (the last target of one is the first input of the next); the final
(n_tokens - 1) % seq_len tokens are not used. A document crossing a sequence boundary is
split: each piece starts at position 0 with its own document id.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from typing import Any

import numpy as np
import torch

META = "meta.json"


class PackedCorpus:
    def __init__(self, path: str) -> None:
        meta_path = os.path.join(path, META)
        if not os.path.isfile(meta_path):
            raise ValueError(f"data.packed={path!r} is not a packed corpus (no {META}); the "
                             f"driver prepares it (longtrain.data.prepare.prepare_data)")
        with open(meta_path) as f:
            self.meta: dict[str, Any] = json.load(f)
        self.path = path
        self.tokens = np.load(os.path.join(path, "tokens.npy"), mmap_mode="r")
        self.doc_starts = np.load(os.path.join(path, "doc_starts.npy"), mmap_mode="r")
        self._perms: dict[tuple[int, int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def num_sequences(self, seq_len: int) -> int:
        """Sequences of `seq_len` inputs (+1 target) per epoch."""
        return max(0, (self.n_tokens - 1) // seq_len)

    def _permutation(self, epoch: int, n: int, seed: int) -> np.ndarray:
        key = (epoch, n, seed)
        with self._lock:
            if key not in self._perms:
                if len(self._perms) >= 2:
                    self._perms.pop(next(iter(self._perms)))
                self._perms[key] = np.random.default_rng([seed, epoch]).permutation(n)
            return self._perms[key]

    def start_of(self, index: int, *, seq_len: int, seed: int) -> int:
        """Token offset of global sequence `index`."""
        n = self.num_sequences(seq_len)
        if n < 1:
            raise ValueError(f"the packed corpus {self.path} has {self.n_tokens} tokens, fewer "
                             f"than data.seq_len + 1 = {seq_len + 1}")
        epoch, j = divmod(index, n)
        if epoch:
            j = int(self._permutation(epoch, n, seed)[j])
        return j * seq_len

    def sequence(self, index: int, *, seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and document ids ([seq_len + 1] int64 each; documents numbered from 0
        within the sequence) of global sequence `index`."""
        a = self.start_of(index, seq_len=seq_len, seed=seed)
        ids = np.asarray(self.tokens[a:a + seq_len + 1], dtype=np.int64)
        # documents starting inside the sequence (after its first token)
        lo = int(np.searchsorted(self.doc_starts, a, side="right"))
        hi = int(np.searchsorted(self.doc_starts, a + seq_len, side="right"))
        docs = np.zeros(seq_len + 1, dtype=np.int64)
        docs[np.asarray(self.doc_starts[lo:hi]) - a] = 1
        return ids, np.cumsum(docs)

    def batch(self, indices: list[int], *, seq_len: int, seed: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and document ids of the given global sequences, [N, seq_len + 1] int64."""
        rows = [self.sequence(i, seq_len=seq_len, seed=seed) for i in indices]
        return (torch.from_numpy(np.stack([r[0] for r in rows])),
                torch.from_numpy(np.stack([r[1] for r in rows])))


@functools.lru_cache(maxsize=4)
def open_packed(path: str) -> PackedCorpus:
    """The packed corpus at `path`, opened once per process."""
    return PackedCorpus(path)
