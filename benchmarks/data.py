"""Data loader throughput vs what the training step consumes, at the default configuration.

    python -m benchmarks.data [--quick] [--out BENCHMARKS.md]

Consumption: the default run (tiny model, data.seq_len=1024, data.batch_size=4, 2 data-parallel
ranks of 1 CPU thread each) trained for a few steps on one rank of 1 thread
(`run_distributed`, world size 1, the whole batch), giving the tokens one rank's step uses
per second; its `data_wait_s` shows whether the step waited on the prefetched data.
Supply: the prefetching iterator of DP rank 0 of 2 (this rank's half of every global batch),
drained as fast as it produces, for synthetic tasks, a packed jsonl corpus and the same corpus
streamed through `datasets`. Both in one process tree, one after the other; the ratio is
supply / consumption (the target is >= 10).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any, Optional

import torch

from benchmarks.report import replace_section
from longtrain.config.schema import DataConfig, RunConfig


def _train_worker(runtime: Any, cfg: RunConfig, out_path: str) -> None:
    from longtrain.train.loop import train

    torch.save(list(train(cfg, runtime)), out_path)


def step_consumption(*, steps: int, warmup: int) -> dict[str, float]:
    """Tokens per second one rank's training step consumes at the default configuration."""
    from longtrain.parallel.spawn import run_distributed

    cfg = RunConfig()
    default_world = cfg.parallel.world_size
    per_rank_batch = cfg.data.batch_size // default_world
    # one rank doing the whole global batch takes world_size times as long per step as each
    # default rank does on its share: the rate per rank is the same
    cfg.parallel.world_size = 1
    cfg.train.steps = warmup + steps
    cfg.train.save_hf = False
    cfg.checkpoint.resume, cfg.checkpoint.every, cfg.checkpoint.save_final = "never", 0, False
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "metrics.pt")
        run_distributed(_train_worker, world_size=1, args=(cfg, path), threads=1)
        metrics = torch.load(path, weights_only=False)[warmup:]
    step = statistics.median(m["step_time_s"] for m in metrics)
    return {"step_time_s": step, "tokens_per_s": cfg.data.batch_size * cfg.data.seq_len / step,
            "data_wait_s": statistics.median(m["data_wait_s"] for m in metrics),
            "per_rank_batch": per_rank_batch, "seq_len": cfg.data.seq_len}


def loader_rate(d: DataConfig, *, steps: int, dp_size: int = 2) -> float:
    """Tokens per second of DP rank 0's micro-batches through the prefetching iterator."""
    from longtrain.data.loader import iterate, prefetched

    per_step = d.batch_size // dp_size * d.seq_len
    with prefetched(d, iterate(d, start_step=0, dp_size=dp_size, dp_rank=0, cp_size=1,
                               cp_rank=0)) as it:
        next(it)
        start = time.perf_counter()
        for _ in range(steps):
            next(it)
        elapsed = time.perf_counter() - start
    return steps * per_step / elapsed


def _write_corpus(path: str, *, docs: int) -> int:
    import json
    import random

    rng = random.Random(0)
    words = ("the of and to in is was for on that with as by at from his her this which "
             "context long sequence attention ring model token layer training data").split()
    total = 0
    with open(path, "w") as f:
        for i in range(docs):
            # a long-tailed length distribution: most documents short, a few book-length
            n = int(rng.paretovariate(1.2) * 80)
            text = " ".join(rng.choice(words) for _ in range(min(n, 20_000)))
            total += len(text)
            f.write(json.dumps({"text": text, "id": i}) + "\n")
    return total


def _make_tokenizer(corpus: str, out: str) -> str:
    """A byte-level BPE of 8K ids trained on the corpus (a stand-in for a checkpoint's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([corpus], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(out)
    return out


def run(*, quick: bool) -> dict[str, Any]:
    steps = 20 if quick else 100
    consumption = step_consumption(steps=4 if quick else 10, warmup=2)
    rows = []
    for task in ("passkey", "multikey_needle", "assoc_recall"):
        d = DataConfig(task=task)
        rows.append({"source": f"synthetic {task}", "tokens_per_s": loader_rate(d, steps=steps)})
    with tempfile.TemporaryDirectory() as tmp:
        from longtrain.data.packed import open_packed
        from longtrain.data.prepare import prepare_data

        corpus = os.path.join(tmp, "corpus", "train.jsonl")
        os.makedirs(os.path.dirname(corpus))
        chars = _write_corpus(corpus, docs=2_000 if quick else 20_000)
        bpe = _make_tokenizer(corpus, os.path.join(tmp, "tokenizer"))
        prepares = []
        for tokenizer in ("byte", bpe):
            cfg = RunConfig()
            cfg.data = DataConfig(source="files", path=corpus, tokenizer=tokenizer,
                                  cache_dir=os.path.join(tmp, "cache"))
            start = time.perf_counter()
            prepared = prepare_data(cfg).data
            elapsed = time.perf_counter() - start
            name = "byte" if tokenizer == "byte" else "BPE 8K"
            prepares.append({"tokenizer": name, "seconds": elapsed,
                             "tokens": open_packed(prepared.packed).n_tokens})
            rows.append({"source": f"files: packed jsonl, memory-mapped ({name} tokens)",
                         "tokens_per_s": loader_rate(prepared, steps=steps * 5)})
        for tokenizer, name in (("byte", "byte"), (bpe, "BPE 8K")):
            stream = DataConfig(source="hf", name=os.path.dirname(corpus), streaming=True,
                                shuffle_buffer=1000, tokenizer=tokenizer)
            rows.append({"source": f"hf streaming: same corpus, tokenized on the fly ({name})",
                         "tokens_per_s": loader_rate(stream, steps=steps)})
    for row in rows:
        row["ratio"] = row["tokens_per_s"] / consumption["tokens_per_s"]
    return {"consumption": consumption, "rows": rows, "prepares": prepares,
            "corpus_chars": chars, "steps": steps}


def render(result: dict[str, Any]) -> str:
    c = result["consumption"]
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}. Default configuration: tiny model, data.seq_len="
        f"{c['seq_len']}, {c['per_rank_batch']} sequences per rank and step "
        f"(data.batch_size=4 over 2 DP ranks), 1 thread per rank.",
        "",
        f"Training step (one rank): {c['step_time_s'] * 1e3:.0f} ms per "
        f"{RunConfig().data.batch_size} sequences -> **{c['tokens_per_s']:,.0f} tokens/s "
        f"consumed**; median data wait per step with prefetching "
        f"{c['data_wait_s'] * 1e3:.2f} ms.",
        "",
        "| source (DP rank 0 of 2, prefetching iterator) | loader tokens/s | loader / step |",
        "| --- | ---: | ---: |",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['source']} | {row['tokens_per_s']:,.0f} | {row['ratio']:.0f}x |")
    lines += ["", f"Preparing the jsonl corpus ({result['corpus_chars'] / 1e6:.1f} MB of text) on "
              f"the driver, once (load, tokenize with datasets.map, shuffle, pack, write; "
              f"cached afterwards):", ""]
    for p in result["prepares"]:
        lines.append(f"- {p['tokenizer']} tokenizer: {p['seconds']:.1f} s for {p['tokens']:,} "
                     f"tokens ({p['tokens'] / p['seconds']:,.0f} tokens/s)")
    lines += [
        "",
        "`python -m benchmarks.data` (`--quick`: fewer steps and a smaller corpus). Loader "
        "and step run one after the other on the same cores; another job on the machine "
        "lowers both.",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, a smaller corpus")
    parser.add_argument("--out", default="BENCHMARKS.md",
                        help="markdown file to update ('' = none)")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    import datasets

    datasets.disable_progress_bars()
    result = run(quick=args.quick)
    body = render(result)
    print(body)
    worst = min(r["ratio"] for r in result["rows"])
    print(f"\nlowest loader / step ratio: {worst:.1f}x (target >= 10x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.out:
        replace_section(args.out, "data", "Data loader throughput", body)
    return result


if __name__ == "__main__":
    main()
