"""Packing, determinism, resume, DP x CP sharding and the length-upsampling mixture of a
packed corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import (doc_index, files_config, meta, packed_documents, random_docs,
                          write_jsonl)
from longtrain.data.loader import (IGNORE_INDEX, check_resume, data_state, global_batch, iterate,
                                   micro_batches, prefetched, shard_sequences)
from longtrain.data.prepare import prepare_data
from longtrain.data.tokenizer import ByteTokenizer
from longtrain.data.upsample import upsample_counts
from longtrain.parallel.layout import unsplit_from_cp

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("corpus")
    docs = random_docs(120, seed=11, max_words=60)
    write_jsonl(root / "a.jsonl", [{"text": t} for t in docs[:70]])
    write_jsonl(root / "b.jsonl", [{"text": t} for t in docs[70:]])
    return root, docs


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _data(corpus, cache, **overrides):
    root, _ = corpus
    return prepare_data(files_config(root, cache, **{"seq_len": 48, **overrides})).data


def test_every_document_appears_once_in_order_with_bos_and_eos(corpus, cache):
    _, docs = corpus
    ordered = _data(corpus, cache, shuffle=False)
    assert doc_index(ordered.packed).tolist() == list(range(120))
    assert [d.tolist() for d in packed_documents(ordered.packed)] == \
        [TOK.encode(t, bos=True, eos=True) for t in docs]
    shuffled = _data(corpus, cache)
    order = doc_index(shuffled.packed)
    assert sorted(order.tolist()) == list(range(120)) and order.tolist() != list(range(120))
    for k, ids in zip(order, packed_documents(shuffled.packed)):
        assert ids.tolist() == TOK.encode(docs[k], bos=True, eos=True)
    plain = _data(corpus, cache, shuffle=False, add_bos=False, add_eos=False)
    stream = np.concatenate(packed_documents(plain.packed)).tolist()
    assert stream == [b for t in docs for b in t.encode()]


def test_sequences_are_fixed_slices_with_document_ids_positions_and_labels(corpus, cache):
    d = _data(corpus, cache)
    tokens = np.load(f"{d.packed}/tokens.npy").astype(np.int64)
    starts = set(np.load(f"{d.packed}/doc_starts.npy").tolist())
    s = d.seq_len
    ids, docs = global_batch(d, list(range(6)))
    mb = shard_sequences(ids, cp_size=1, cp_rank=0, doc_bt1=docs)
    for i in range(6):
        a = i * s
        assert ids[i].tolist() == tokens[a:a + s + 1].tolist()
        # a new document id exactly where a document starts (after the first token)
        changes = [t for t in range(1, s + 1) if docs[i, t] != docs[i, t - 1]]
        assert changes == [t for t in range(1, s + 1) if a + t in starts]
        assert docs[i, 0] == 0 and docs[i].tolist() == sorted(docs[i].tolist())
        for t in range(s):
            # labels: the next token, ignored where it starts another document
            want = IGNORE_INDEX if a + t + 1 in starts else tokens[a + t + 1]
            assert mb.labels_bt[i, t] == want
            # positions restart at each document start and at the sequence start
            back = next(k for k in range(t, -1, -1) if k == 0 or a + k in starts)
            assert mb.positions_bt[i, t] == t - back
        if a + s in starts:
            assert mb.labels_bt[i, s - 1] == IGNORE_INDEX
    # BOS starts each document, EOS ends it: a boundary's ignored label is always a BOS
    assert all(tokens[p] == TOK.bos_id for p in starts)


def test_same_seed_same_sequences_and_another_seed_another_order(corpus, cache):
    a, b = _data(corpus, cache, seed=3), _data(corpus, cache, seed=3)
    c = _data(corpus, cache, seed=4)
    idx = list(range(8))
    assert a.packed == b.packed
    assert torch.equal(global_batch(a, idx)[0], global_batch(b, idx)[0])
    assert not torch.equal(global_batch(a, idx)[0], global_batch(c, idx)[0])
    assert sorted(doc_index(a.packed).tolist()) == sorted(doc_index(c.packed).tolist())


def test_later_epochs_permute_the_same_sequences(corpus, cache):
    from longtrain.data.packed import open_packed

    d = _data(corpus, cache)
    n = open_packed(d.packed).num_sequences(d.seq_len)
    epoch0 = global_batch(d, list(range(n)))[0]
    epoch1 = global_batch(d, list(range(n, 2 * n)))[0]
    epoch2 = global_batch(d, list(range(2 * n, 3 * n)))[0]
    assert not torch.equal(epoch0, epoch1) and not torch.equal(epoch1, epoch2)
    key = lambda rows: sorted(map(tuple, rows.tolist()))  # noqa: E731
    assert key(epoch0) == key(epoch1) == key(epoch2)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_at_step_k_gives_the_sequences_of_an_uninterrupted_run(corpus, cache, prefetch):
    d = _data(corpus, cache, batch_size=4, micro_batch_size=2, prefetch=prefetch)
    kw = dict(dp_size=2, dp_rank=1, cp_size=2, cp_rank=0)
    full = prefetched(d, iterate(d, start_step=0, **kw))
    through = [next(full) for _ in range(7)]
    resumed = prefetched(d, iterate(d, start_step=4, **kw))
    for step in range(4, 7):
        got = next(resumed)
        for a, b in zip(got, through[step]):
            assert torch.equal(a.tokens_bt, b.tokens_bt) and torch.equal(a.labels_bt, b.labels_bt)
            assert torch.equal(a.doc_ids_bt, b.doc_ids_bt)
    state = data_state(d, step=4)
    assert state["sequences_consumed"] == 16 and check_resume(d, state) == 4
    other = _data(corpus, cache, seed=9)
    with pytest.raises(ValueError, match="data.seed"):
        check_resume(other, state)


@pytest.mark.parametrize("dp,cp,micro", [(1, 1, 1), (2, 1, 2), (1, 2, 1), (2, 2, 1), (1, 4, 2)])
def test_dp_x_cp_shards_rebuild_the_global_batch(corpus, cache, dp, cp, micro):
    d = _data(corpus, cache, batch_size=4, micro_batch_size=micro)
    step = 3
    ids, docs = global_batch(d, list(range(step * 4, step * 4 + 4)))
    want = shard_sequences(ids, cp_size=1, cp_rank=0, doc_bt1=docs)
    rows: dict[str, list[torch.Tensor]] = {"tokens_bt": [], "labels_bt": [], "positions_bt": [],
                                           "doc_ids_bt": []}
    for dp_rank in range(dp):
        per_cp = [micro_batches(d, step=step, dp_size=dp, dp_rank=dp_rank, cp_size=cp,
                                cp_rank=c) for c in range(cp)]
        for mbs in zip(*per_cp):
            for name in rows:
                shards = [getattr(mb, name) for mb in mbs]
                assert all(x.shape == (micro, d.seq_len // cp) for x in shards)
                rows[name].append(unsplit_from_cp(shards))
    for name, parts in rows.items():
        assert torch.equal(torch.cat(parts), getattr(want, name)), name


# ---------------------------------------------------------------- length upsampling


def test_upsample_counts_keep_each_domains_budget_and_weight_long_documents():
    rng = np.random.default_rng(0)
    domains = np.repeat([0, 1, 2], [300, 200, 50])
    lengths = rng.integers(10, 100, size=550)
    long = rng.random(550) < 0.2
    lengths[long] += 400
    # domain 2 is all long: unchanged
    lengths[500:] = rng.integers(600, 900, size=50)
    counts = upsample_counts(domains, lengths, lengths + 2, threshold=300, factor=4.0, seed=1)
    assert counts.dtype == np.int64 and counts.min() >= 0
    full = lengths + 2
    for d in (0, 1, 2):
        in_d = domains == d
        before, after = full[in_d].sum(), (full * counts)[in_d].sum()
        assert abs(after - before) / before < 0.05, (d, before, after)
    assert (counts[500:] == 1).all()
    is_long = lengths > 300
    for d in (0, 1):
        in_d = domains == d
        ratio = counts[in_d & is_long].mean() / counts[in_d & ~is_long].mean()
        assert 3.0 < ratio < 5.0, ratio
        # every document gets floor or ceil of its expected count
        for group in (in_d & is_long, in_d & ~is_long):
            assert counts[group].max() - counts[group].min() <= 1
    again = upsample_counts(domains, lengths, lengths + 2, threshold=300, factor=4.0, seed=1)
    other = upsample_counts(domains, lengths, lengths + 2, threshold=300, factor=4.0, seed=2)
    assert np.array_equal(counts, again) and not np.array_equal(counts, other)
    assert (upsample_counts(domains, lengths, lengths, threshold=0, factor=4.0, seed=1) == 1).all()


def test_upsampled_corpus_repeats_long_documents_and_keeps_the_domain_mix(tmp_path):
    web = random_docs(400, seed=21, max_words=20)
    web_long = random_docs(16, seed=22, min_words=60, max_words=80)
    code = random_docs(200, seed=23, max_words=20)
    code_long = random_docs(8, seed=24, min_words=60, max_words=80)
    write_jsonl(tmp_path / "c" / "web.jsonl", [{"text": t} for t in web + web_long])
    write_jsonl(tmp_path / "c" / "code.jsonl", [{"text": t} for t in code + code_long])
    base = prepare_data(files_config(tmp_path / "c", tmp_path / "cache", seq_len=32)).data
    up = prepare_data(files_config(tmp_path / "c", tmp_path / "cache", seq_len=32,
                                   upsample_threshold=300, upsample_factor=3.0)).data
    m0, m1 = meta(base.packed), meta(up.packed)

    def share(m, key):
        return [x[key] / sum(y[key] for y in m["domains"]) for x in m["domains"]]

    # each domain's share of the corpus is what it was
    assert share(m1, "tokens_packed") == pytest.approx(share(m0, "tokens_packed"), abs=0.02)
    assert [x["name"] for x in m1["domains"]] == ["code.jsonl", "web.jsonl"]
    for x0, x1 in zip(m0["domains"], m1["domains"]):
        assert x1["tokens_packed"] == pytest.approx(x0["tokens_packed"], rel=0.05)
        assert x1["long_tokens"] > 0 and x1["long_tokens_packed"] > 1.8 * x1["long_tokens"]
        assert x1["tokens"] == x0["tokens"]
    # long documents are repeated, short ones partly dropped; copies are identical documents
    counts = np.bincount(doc_index(up.packed), minlength=624)
    rows = {"code": (0, 208), "web": (208, 624)}
    for name, (lo, hi) in rows.items():
        n_short = 200 if name == "code" else 400
        assert counts[hi - (hi - lo - n_short):hi].min() >= 2
        assert counts[lo:lo + n_short].max() <= 1 and counts[lo:lo + n_short].sum() < n_short
    docs_by_row = {}
    for k, ids in zip(doc_index(up.packed), packed_documents(up.packed)):
        docs_by_row.setdefault(int(k), ids.tolist())
        assert docs_by_row[int(k)] == ids.tolist()


def test_docs_per_seq_synthetic_packing_still_works():
    from longtrain.config.schema import DataConfig

    d = DataConfig(seq_len=384, docs_per_seq=2, batch_size=2)
    ids, docs = global_batch(d, [0, 1])
    assert ids.shape == docs.shape == (2, 385)
    assert docs[0].tolist() == [0] * 192 + [1] * 193
    mb = micro_batches(d, step=0, dp_size=1, dp_rank=0, cp_size=2, cp_rank=0)[0]
    assert mb.doc_ids_bt is not None and mb.tokens_bt.shape == (1, 192)
