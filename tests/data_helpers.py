"""Tiny corpora and a tiny Hugging Face tokenizer for the data tests (written to temp dirs;
nothing is downloaded)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np

from longtrain.config.schema import DataConfig, RunConfig

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega").split()


def random_docs(n: int, *, seed: int, min_words: int = 1, max_words: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [f"doc{seed}-{i} " + " ".join(rng.choice(WORDS)
                                          for _ in range(rng.randint(min_words, max_words)))
            for i in range(n)]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def write_json(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def write_parquet(path: Path, records: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_text_dir(path: Path, docs: list[str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (path / f"{i:04d}.txt").write_text(doc)
    return path


def make_hf_tokenizer(path: Path) -> Path:
    """A byte-level BPE of 300 ids trained on a few sentences, saved as transformers does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20 + random_docs(50, seed=99), trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(path)
    return path


def files_config(path: Path | str, cache: Path | str, **overrides: Any) -> RunConfig:
    cfg = RunConfig()
    fields = {"seq_len": 16, "batch_size": 4, **overrides}
    cfg.data = DataConfig(source="files", path=str(path), cache_dir=str(cache), **fields)
    return cfg


def packed_documents(packed: str) -> list[np.ndarray]:
    """Every packed document's token ids (with BOS / EOS), in packed order."""
    tokens = np.load(os.path.join(packed, "tokens.npy"))
    starts = np.load(os.path.join(packed, "doc_starts.npy"))
    ends = np.append(starts[1:], len(tokens))
    return [tokens[a:b].astype(np.int64) for a, b in zip(starts, ends)]


def doc_index(packed: str) -> np.ndarray:
    return np.load(os.path.join(packed, "doc_index.npy"))


def meta(packed: str) -> dict[str, Any]:
    with open(os.path.join(packed, "meta.json")) as f:
        return json.load(f)


def decode_docs(packed: str, tokenizer: Optional[Any] = None) -> list[str]:
    from longtrain.data.tokenizer import ByteTokenizer

    tok = tokenizer or ByteTokenizer()
    return [tok.decode([int(t) for t in d if t not in (tok.bos_id, tok.eos_id)])
            for d in packed_documents(packed)]
