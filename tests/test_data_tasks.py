"""Synthetic long-context tasks (passkey, multi-key needle, associative recall) as training
sources, and their evaluation counterparts (prompts with known answers, scoring)."""

from __future__ import annotations

import re

import pytest
import torch

from data_helpers import make_hf_tokenizer
from longtrain.config.schema import DataConfig
from longtrain.planning.validate import problems
from longtrain.data.eval_tasks import answer_max_tokens, make_eval_prompts, score
from longtrain.data.loader import global_batch, micro_batches
from longtrain.data.synthetic import TASKS, task_sample, task_tokens
from longtrain.data.tokenizer import ByteTokenizer, load_tokenizer

TOK = ByteTokenizer()
ALL = sorted(TASKS)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> str:
    return str(make_hf_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer"))


@pytest.mark.parametrize("task", ALL)
def test_task_samples_are_deterministic_exact_length_with_recoverable_answers(task):
    for seq_len in (600, 1024, 3001):
        samples = [task_sample(task, seq_len=seq_len, seed=5, index=i) for i in range(4)]
        again = [task_sample(task, seq_len=seq_len, seed=5, index=i) for i in range(4)]
        assert samples == again
        for s in samples:
            assert len(s.ids) == seq_len + 1
            assert s.ids[0] == TOK.bos_id and s.ids[-1] == TOK.eos_id
            assert max(s.ids) < TOK.vocab_size and 0.0 <= s.depth < 1.0
            assert s.answers and len(s.answers) == len(s.answer_starts)
            text = TOK.decode(s.ids)
            for answer, start in zip(s.answers, s.answer_starts):
                assert TOK.decode(s.ids[start:start + len(answer)]) == answer
                # the answer is stated in the context before it is asked for
                assert text.index(answer) < len(TOK.decode(s.ids[:start]))
        assert len({s.answers for s in samples}) == 4, "different indices, different answers"
    other = task_sample(task, seq_len=1024, seed=6, index=0)
    assert other.ids != task_sample(task, seq_len=1024, seed=5, index=0).ids


def test_multikey_needle_hides_distinct_keys_and_asks_for_one():
    s = task_sample("multikey_needle", seq_len=2048, seed=1, index=3)
    text = TOK.decode(s.ids)
    needles = re.findall(r"special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", text)
    assert len(needles) == 4 and len({k for k, _ in needles}) == 4
    asked = re.search(r"What is the special magic number for ([a-z]+-[a-z]+)\?", text).group(1)
    assert dict(needles)[asked] == s.answers[0]


def test_assoc_recall_queries_keys_of_the_context():
    s = task_sample("assoc_recall", seq_len=2048, seed=2, index=0)
    text = TOK.decode(s.ids)
    context, queries = text.split("Recall.\n")
    pairs = dict(re.findall(r"([a-z]{4}): (\d{4})\n", context))
    asked = re.findall(r"([a-z]{4}): (\d{4})\n", queries)
    assert len(pairs) > 100 and len(asked) == 4
    assert [v for _, v in asked] == list(s.answers)
    assert all(pairs[k] == v for k, v in asked)


@pytest.mark.parametrize("task", ALL)
def test_too_short_names_seq_len_and_the_exact_minimum(task):
    with pytest.raises(ValueError, match=rf"data\.seq_len=50 is too short for the {task} task"):
        task_sample(task, seq_len=50, seed=0, index=0)
    try:
        task_sample(task, seq_len=50, seed=0, index=0)
    except ValueError as exc:
        minimum = int(re.search(r"needs data\.seq_len >= (\d+)", str(exc)).group(1))
    for index in range(3):
        assert len(task_sample(task, seq_len=minimum, seed=0, index=index).ids) == minimum + 1
    with pytest.raises(ValueError):
        task_sample(task, seq_len=minimum - 1, seed=0, index=0)
    cfg_problems = problems(_run(task=task, seq_len=64))
    assert any("data.seq_len=64" in p and task in p for p in cfg_problems)


def _run(**data):
    from longtrain.config.schema import RunConfig

    cfg = RunConfig()
    cfg.data = DataConfig(**data)
    return cfg


@pytest.mark.parametrize("task", ALL)
def test_tasks_as_a_data_source_with_packing_and_sharding(task):
    d = DataConfig(task=task, seq_len=1200, batch_size=4, docs_per_seq=2)
    assert problems(_run(**vars(d))) == []
    ids, docs = global_batch(d, [0, 1])
    assert ids.shape == docs.shape == (2, 1201) and docs[0].tolist() == [0] * 600 + [1] * 601
    assert ids[0, 0] == TOK.bos_id and ids[0, 600] == TOK.bos_id
    single = DataConfig(task=task, seq_len=1024)
    assert torch.equal(global_batch(single, [7])[0], task_tokens(task, seq_len=1024, seed=0,
                                                                  indices=[7]))
    mb = micro_batches(single, step=0, dp_size=2, dp_rank=1, cp_size=2, cp_rank=1)
    assert mb[0].tokens_bt.shape == (1, 512) and mb[0].doc_ids_bt is None


def test_tasks_with_a_hugging_face_tokenizer(hf_tokenizer):
    tok = load_tokenizer(hf_tokenizer)
    for task in ALL:
        s = task_sample(task, seq_len=700, seed=0, index=1, tokenizer=tok)
        assert len(s.ids) == 701 and s.ids[0] == tok.bos_id and s.ids[-1] == tok.eos_id
        assert max(s.ids) < tok.vocab_size
        for answer, start in zip(s.answers, s.answer_starts):
            assert tok.decode(s.ids[start:start + 12]).startswith(answer)
    d = DataConfig(task="passkey", seq_len=512, tokenizer=hf_tokenizer)
    assert global_batch(d, [0])[0].max() < 300


# ---------------------------------------------------------------- evaluation counterparts


@pytest.mark.parametrize("task", ALL)
def test_eval_prompts_have_exact_length_answer_at_depth_and_are_deterministic(task):
    for length in (2000, 4000):
        for depth in (0.0, 0.5, 1.0):
            prompts = make_eval_prompts(task, length=length, depth=depth, n=3, seed=1)
            assert prompts == make_eval_prompts(task, length=length, depth=depth, n=3, seed=1)
            assert len({p.answer for p in prompts}) == 3
            for p in prompts:
                assert (p.task, p.length, p.depth) == (task, length, depth)
                assert len(p.ids) == length and p.ids[0] == TOK.bos_id
                assert TOK.eos_id not in p.ids
                text = TOK.decode(p.ids)
                # the fact is in the prompt, at about `depth` of it; the answer is not given
                at = text.index(p.answer) / len(text)
                assert abs(at - depth) < 0.15, (task, length, depth, at)
                question = text.rindex("\n" if task == "assoc_recall" else "?")
                assert p.answer not in text[question:]
    train = {s.answers[0] for s in (task_sample(task, seq_len=700, seed=1, index=i)
                                    for i in range(3))}
    assert not train & {p.answer for p in make_eval_prompts(task, length=700, depth=0.5, n=3,
                                                            seed=1)}
    with pytest.raises(ValueError, match="length=10 is too short"):
        make_eval_prompts(task, length=10, depth=0.5, n=1)


def test_eval_prompts_refuse_bad_arguments():
    with pytest.raises(ValueError, match="task='nope'"):
        make_eval_prompts("nope", length=100, depth=0.5, n=1)
    with pytest.raises(ValueError, match="depth=1.5"):
        make_eval_prompts("passkey", length=1000, depth=1.5, n=1)
    with pytest.raises(ValueError, match="n=0"):
        make_eval_prompts("passkey", length=1000, depth=0.5, n=0)


def test_score_counts_whole_answer_matches():
    prompts = make_eval_prompts("passkey", length=800, depth=0.3, n=4, seed=2)
    answers = [p.answer for p in prompts]
    predictions = [answers[0] + ". Remember", f" {answers[1]}", answers[2] + "9", "no idea"]
    result = score("passkey", predictions, answers)
    assert result["correct"] == [True, True, False, False]
    assert result["accuracy"] == 0.5 and result["n"] == 4
    assert score("assoc_recall", ["1234\nabcd"], ["1234"])["accuracy"] == 1.0
    assert answer_max_tokens(prompts) == 5 + 4
    with pytest.raises(ValueError, match="2 predictions for 1 answers"):
        score("passkey", ["a", "b"], ["a"])


@pytest.mark.parametrize("task,docs", [(t, d) for t in ALL for d in (1, 2)])
def test_answer_weights_mark_exactly_the_answers_and_follow_the_cp_shards(task, docs):
    from longtrain.data.loader import answer_weights, shard_sequences

    d = DataConfig(task=task, seq_len=1200, batch_size=2, micro_batch_size=2, docs_per_seq=docs,
                   answer_loss_weight=10.0)
    ids, doc_ids = global_batch(d, [3, 4])
    weights = answer_weights(d, [3, 4])
    assert weights.shape == ids.shape and set(weights.unique().tolist()) == {1.0, 10.0}
    doc_len = [1201 // docs] * docs
    doc_len[-1] += 1201 - sum(doc_len)
    for row, i in enumerate([3, 4]):
        # the weighted tokens, read back, are the answers of the sequence's documents in order
        want = []
        for j in range(docs):
            want += task_sample(task, seq_len=doc_len[j] - 1, seed=0, index=i * docs + j).answers
        assert TOK.decode(ids[row][weights[row] == 10.0].tolist()) == "".join(want)
    # CP shards carry the weights of their own targets: the answers, wherever they land
    whole = shard_sequences(ids, cp_size=1, cp_rank=0, doc_bt1=doc_ids, weight_bt1=weights)
    shards = [shard_sequences(ids, cp_size=2, cp_rank=r, doc_bt1=doc_ids, weight_bt1=weights)
              for r in range(2)]
    assert sum(s.target_weight for s in shards) == whole.target_weight
    answer_labels = lambda mb: sorted(mb.labels_bt[mb.weights_bt == 10.0].tolist())  # noqa: E731
    assert sorted(sum((answer_labels(s) for s in shards), [])) == answer_labels(whole)
    # micro_batches (the training path) attaches them; weight 1 attaches none
    assert torch.equal(micro_batches(d, step=0, dp_size=1, dp_rank=0, cp_size=1,
                                     cp_rank=0)[0].weights_bt, answer_weights(d, [0, 1])[:, 1:])
    plain = DataConfig(task=task, seq_len=1200, batch_size=2, micro_batch_size=2,
                       docs_per_seq=docs)
    assert micro_batches(plain, step=0, dp_size=1, dp_rank=0, cp_size=1,
                         cp_rank=0)[0].weights_bt is None


def _weighted_loss_worker(rt) -> None:
    from longtrain.train.loss import token_loss_sum

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, 12, generator=gen)
    labels = torch.randint(0, 12, (2, 7), generator=gen)
    labels[0, 2] = -100
    weights = torch.rand(2, 7, generator=gen) * 5
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                  reduction="none", ignore_index=-100)
    # each TP rank holds half of the vocabulary
    shard = logits.chunk(2, dim=-1)[rt.tp_rank]
    torch.testing.assert_close(token_loss_sum(shard, labels, weights),
                               (per_token * weights.flatten()).sum())
    torch.testing.assert_close(token_loss_sum(shard, labels), per_token.sum())


def test_weighted_token_loss_is_the_weighted_sum_under_tp() -> None:
    from longtrain.parallel.spawn import run_distributed

    run_distributed(_weighted_loss_worker, world_size=2, tp=2)


@pytest.mark.parametrize("change,expected", [
    ({"answer_loss_weight": 0.0}, "data.answer_loss_weight=0.0 must be > 0"),
    ({"source": "files", "path": "/nonexistent", "answer_loss_weight": 5.0},
     "data.answer_loss_weight=5.0 weighs the answers of the synthetic tasks"),
])
def test_bad_answer_loss_weight_names_the_field(change, expected):
    from longtrain.data.loader import source_problems

    assert any(expected in p for p in source_problems(DataConfig(**change)))
