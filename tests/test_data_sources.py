"""Corpora through `datasets`: every file format, the text field, a Hugging Face tokenizer
directory, hub-style dataset names (a local dataset directory), streaming, and bad data —
each handled or refused with a message naming the file and the field."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import (decode_docs, files_config, make_hf_tokenizer, meta,
                          packed_documents, random_docs, write_json, write_jsonl, write_parquet,
                          write_text_dir)
from longtrain.config.errors import ConfigError
from longtrain.planning.validate import problems
from longtrain.data.loader import global_batch
from longtrain.data.prepare import prepare_data
from longtrain.data.tokenizer import ByteTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> str:
    return str(make_hf_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer"))


def _prepare(path: Path | str, cache: Path, **overrides):
    return prepare_data(files_config(path, cache, **overrides)).data


# ---------------------------------------------------------------- formats and fields


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "txt"])
def test_each_file_format_packs_every_document_in_order(tmp_path, fmt):
    docs = random_docs(40, seed=1)
    writer = {"jsonl": write_jsonl, "json": write_json, "parquet": write_parquet}.get(fmt)
    if writer is None:
        path = write_text_dir(tmp_path / "corpus", docs)
    else:
        records = [{"text": t, "id": i} for i, t in enumerate(docs)]
        path = writer(tmp_path / f"corpus.{fmt}", records)
    d = _prepare(path, tmp_path / "cache", shuffle=False)
    assert decode_docs(d.packed) == docs
    tok = ByteTokenizer()
    for ids, text in zip(packed_documents(d.packed), docs):
        assert ids.tolist() == tok.encode(text, bos=True, eos=True)
    m = meta(d.packed)
    assert m["n_docs"] == 40 and m["empty_docs"] == 0
    assert m["n_tokens"] == sum(len(t.encode()) + 2 for t in docs)


def test_directory_of_mixed_formats_and_compressed_json(tmp_path):
    import gzip
    import json

    root = tmp_path / "corpus"
    write_jsonl(root / "a.jsonl", [{"text": "from jsonl"}])
    write_parquet(root / "b" / "c.parquet", [{"text": "from parquet"}])
    write_text_dir(root / "books", ["from a text file"])
    with gzip.open(root / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "from gzip"}) + "\n")
    (root / "README.csv").write_text("ignored,unsupported\n")
    (root / ".hidden.jsonl").write_text('{"text": "hidden"}\n')
    d = _prepare(root, tmp_path / "cache", shuffle=False, seq_len=4)
    assert decode_docs(d.packed) == ["from jsonl", "from parquet", "from gzip", "from a text file"]
    assert [x["name"] for x in meta(d.packed)["domains"]] == ["a.jsonl", "b/c.parquet",
                                                              "d.jsonl.gz", "books"]


def test_text_field_choice_and_a_missing_field_is_refused_naming_file_and_fields(tmp_path):
    records = [{"body": t, "title": "x"} for t in random_docs(5, seed=2)]
    path = write_jsonl(tmp_path / "c.jsonl", records)
    d = _prepare(path, tmp_path / "cache", text_field="body", shuffle=False)
    assert decode_docs(d.packed) == random_docs(5, seed=2)
    with pytest.raises(ConfigError) as info:
        _prepare(path, tmp_path / "cache")
    msg = str(info.value)
    assert str(path) in msg and "'text'" in msg and "data.text_field" in msg
    assert "['body', 'title']" in msg


def test_glob_path(tmp_path):
    write_jsonl(tmp_path / "x" / "p1.jsonl", [{"text": "one"}])
    write_jsonl(tmp_path / "x" / "p2.jsonl", [{"text": "two"}])
    write_jsonl(tmp_path / "x" / "other.jsonl", [{"text": "not matched"}])
    d = _prepare(str(tmp_path / "x" / "p*.jsonl"), tmp_path / "cache", shuffle=False, seq_len=4)
    assert decode_docs(d.packed) == ["one", "two"]


def test_hugging_face_tokenizer_directory(tmp_path, hf_tokenizer):
    docs = random_docs(20, seed=3)
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in docs])
    tok = load_tokenizer(hf_tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 300)
    d = _prepare(path, tmp_path / "cache", tokenizer=hf_tokenizer, shuffle=False, num_proc=2)
    got = packed_documents(d.packed)
    assert [g.tolist() for g in got] == [tok.encode(t, bos=True, eos=True) for t in docs]
    assert [tok.decode(g.tolist()) for g in got] == docs
    assert meta(d.packed)["dtype"] == "uint16" and meta(d.packed)["vocab_size"] == 300
    # the model's embedding must cover the tokenizer: message names both
    cfg = files_config(path, tmp_path / "cache", tokenizer=hf_tokenizer)
    cfg.model.vocab_size = 256
    found = [p for p in problems(cfg) if "model.vocab_size=256" in p]
    assert found and "300" in found[0] and hf_tokenizer in found[0]
    # a directory that holds no tokenizer, and a path that is neither
    (tmp_path / "empty").mkdir()
    bad = files_config(path, tmp_path / "cache", tokenizer=str(tmp_path / "empty"))
    assert any("cannot load a Hugging Face tokenizer" in p for p in problems(bad))
    bad.data.tokenizer = str(tmp_path / "nope")
    assert any("neither 'auto', 'byte' nor a directory" in p for p in problems(bad))


def test_tokenized_and_packed_corpora_are_cached(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in random_docs(30, seed=4)])
    first = _prepare(path, tmp_path / "cache")
    mtime = os.path.getmtime(os.path.join(first.packed, "tokens.npy"))
    again = _prepare(path, tmp_path / "cache")
    assert again.packed == first.packed
    assert os.path.getmtime(os.path.join(again.packed, "tokens.npy")) == mtime
    # seq_len is not part of the key; the seed, BOS / EOS and the file's contents are
    assert _prepare(path, tmp_path / "cache", seq_len=32).packed == first.packed
    assert _prepare(path, tmp_path / "cache", seed=1).packed != first.packed
    assert _prepare(path, tmp_path / "cache", add_bos=False).packed != first.packed
    write_jsonl(path, [{"text": t} for t in random_docs(30, seed=5)])
    changed = _prepare(path, tmp_path / "cache")
    assert changed.packed != first.packed
    assert decode_docs(changed.packed) != decode_docs(first.packed)


# ---------------------------------------------------------------- bad data


def test_empty_documents_are_dropped_and_counted(tmp_path):
    records = [{"text": "first"}, {"text": ""}, {"text": "   \n"}, {"text": None}, {"text": "last"}]
    path = write_jsonl(tmp_path / "c.jsonl", records)
    write_text_dir(tmp_path / "texts", ["", "a text"])
    d = _prepare(path, tmp_path / "cache", shuffle=False, seq_len=4)
    assert decode_docs(d.packed) == ["first", "last"]
    assert meta(d.packed)["empty_docs"] == 3
    d = _prepare(tmp_path / "texts", tmp_path / "cache", shuffle=False, seq_len=4)
    assert decode_docs(d.packed) == ["a text"] and meta(d.packed)["empty_docs"] == 1


def test_bytes_that_are_not_utf8_are_replaced_not_fatal(tmp_path, caplog):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.jsonl").write_bytes(b'{"text": "bad \xff byte"}\n{"text": "fine"}\n')
    (root / "b.jsonl").write_bytes(b'{"text": "two \xff\xfe bad"}\n')
    # a JSON array is parsed as a whole: the reader itself fails on the bad byte
    (root / "b2.json").write_bytes(b'[{"text": "array \xff item"}]')
    (root / "c.txt").write_bytes(b"text file \xc3 with a broken sequence")
    d = _prepare(root, tmp_path / "cache", shuffle=False)
    texts = decode_docs(d.packed)
    assert texts[0] == "bad \ufffd byte" and texts[1] == "fine"
    assert texts[2].startswith("two \ufffd") and texts[3] == "array \ufffd item"
    assert texts[4] == "text file \ufffd with a broken sequence"
    m = meta(d.packed)
    assert m["docs_with_replacement_chars"] == 4 and m["replacement_chars"] >= 4
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "b2.json: 1 byte(s) that are not UTF-8 replaced" in warned
    assert "a.jsonl: field 'text' holds bytes that are not UTF-8" in warned


@pytest.mark.parametrize("case", ["missing_path", "empty_dir", "unsupported", "broken_json",
                                  "not_text", "too_small"])
def test_bad_inputs_are_refused_naming_the_file_or_field(tmp_path, case):
    cache = tmp_path / "cache"
    if case == "missing_path":
        cfg = files_config(tmp_path / "nowhere.jsonl", cache)
        assert any(f"data.path='{tmp_path / 'nowhere.jsonl'}' does not exist" in p
                   for p in problems(cfg))
        match = "does not exist"
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        cfg = files_config(tmp_path / "empty", cache)
        match = "contains no data files"
    elif case == "unsupported":
        (tmp_path / "c.csv").write_text("text\nx\n")
        cfg = files_config(tmp_path / "c.csv", cache)
        match = r"c\.csv'?: unsupported file type"
    elif case == "broken_json":
        (tmp_path / "broken.jsonl").write_text('{"text": "a"\n')
        cfg = files_config(tmp_path / "broken.jsonl", cache)
        match = r"cannot read .*broken\.jsonl as json"
    elif case == "not_text":
        write_jsonl(tmp_path / "n.jsonl", [{"text": 5}])
        cfg = files_config(tmp_path / "n.jsonl", cache)
        match = r"n\.jsonl: field 'text' \(data\.text_field\) holds .*int64.*not text"
    else:
        write_jsonl(tmp_path / "s.jsonl", [{"text": "tiny"}])
        cfg = files_config(tmp_path / "s.jsonl", cache, seq_len=64)
        match = r"data\.path=.*s\.jsonl.* has 6 tokens .* fewer than data\.seq_len \+ 1 = 65"
    with pytest.raises(ConfigError, match=match):
        prepare_data(cfg)


def test_documents_longer_than_seq_len_are_split(tmp_path):
    long_doc = " ".join(random_docs(1, seed=6, min_words=100, max_words=100))
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "short one"}, {"text": long_doc}])
    d = _prepare(path, tmp_path / "cache", shuffle=False, seq_len=32)
    ids, docs = global_batch(d, list(range(4)))
    stream = np.load(os.path.join(d.packed, "tokens.npy")).astype(np.int64)
    for i in range(4):
        assert ids[i].tolist() == stream[i * 32:i * 32 + 33].tolist()
    # the short document (11 tokens with BOS/EOS) then the long one, cut into 32-token pieces
    assert docs[0].tolist() == [0] * 11 + [1] * 22
    assert all(docs[i].tolist() == [0] * 33 for i in (1, 2, 3)), "a piece is one document"


# ---------------------------------------------------------------- hub names and streaming


def test_hf_source_from_a_local_dataset_directory_and_streaming(tmp_path):
    docs = random_docs(60, seed=7)
    write_jsonl(tmp_path / "ds" / "train.jsonl", [{"content": t} for t in docs])
    cfg = files_config("unused", tmp_path / "cache", text_field="content", shuffle=False,
                       seq_len=32)
    cfg.data.source, cfg.data.path, cfg.data.name = "hf", None, str(tmp_path / "ds")
    assert problems(cfg) == []
    packed = prepare_data(cfg).data
    assert decode_docs(packed.packed) == docs
    # the stream is the same token stream, read sequentially: same sequences
    cfg.data.streaming = True
    streamed = prepare_data(cfg).data
    assert streamed.packed is None
    want_ids, want_docs = global_batch(packed, list(range(12)))
    got_ids, got_docs = global_batch(streamed, list(range(12)))
    assert torch.equal(got_ids, want_ids) and torch.equal(got_docs, want_docs)
    # a later index (a resume) skips forward; an earlier one restarts the stream
    from longtrain.data.streaming import StreamCursor

    fresh = StreamCursor(streamed)
    assert torch.equal(fresh.batch([9, 10])[0], want_ids[9:11])
    assert torch.equal(fresh.batch([2])[0], want_ids[2:3])
    # past the end the stream starts its next epoch
    assert fresh.batch([500])[0].shape == (1, 33)
    # missing field / name
    cfg.data.text_field = "text"
    with pytest.raises(ConfigError, match=r"records have no field 'text'.*\['content'\]"):
        prepare_data(cfg)
    cfg.data.name = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="missing"):
        prepare_data(cfg)


def test_static_data_problems_are_listed_before_anything_loads(tmp_path):
    cfg = files_config(tmp_path / "x.jsonl", tmp_path / "cache", upsample_factor=0.5,
                       prefetch=-1, num_proc=0, streaming=True)
    cfg.data.path = None
    found = problems(cfg)
    for fragment in ("data=files needs data.path", "data.upsample_factor=0.5",
                     "data.prefetch=-1", "data.num_proc=0", "data.streaming=true is for data=hf"):
        assert any(fragment in p for p in found), (fragment, found)
    cfg.data.source = "hf"
    assert any("data=hf needs data.name" in p for p in problems(cfg))
    cfg.data.source = "bogus"
    assert any("data.source='bogus'" in p for p in problems(cfg))


def test_packed_source_needs_preparation(tmp_path):
    cfg = files_config(tmp_path, tmp_path / "cache")
    with pytest.raises(ValueError, match="data.packed is not set"):
        global_batch(cfg.data, [0])
