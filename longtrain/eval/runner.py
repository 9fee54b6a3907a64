"""The long-context evaluation on one rank: needle / passkey prompts over a (length x depth)
grid and perplexity vs length, with the same result on every rank.

Prompts and perplexity sequences are spread round-robin over DP ranks; the TP x CP ranks of
one DP replica work on the same prompt together (vocabulary-parallel argmax, zigzag CP
shards), and the per-prompt predictions and NLL sums are summed over the groups at the end.
`evaluate_with` takes the forward pass as a function, so the transformers backend
(`hf_backend.py`) and the tests' oracles share every line of the scoring.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from longtrain.checkpoint.source import read_model_source
from longtrain.config.eval_schema import EvalRunConfig
from longtrain.config.schema import DataConfig
from longtrain.data.eval_tasks import make_eval_prompts
from longtrain.data.loader import MicroBatch, global_batch, stream_cursor
from longtrain.data.tokenizer import load_tokenizer
from longtrain.eval.scoring import Forward, LossSum, predict_answer, sequence_nll
from longtrain.observability.log import get_logger
from longtrain.parallel.runtime import ParallelRuntime
from longtrain.train.build import attention_context, load_weights, make_model
from longtrain.train.loss import token_loss_sum

# Synthetic samples are a function of (data.seed, index) and training reads indices 0, 1, 2,
# ...: perplexity sequences start far above, so they were never trained on by a run of fewer
# than 2**30 sequences. A packed corpus repeats (reshuffled) after one epoch, so no offset
# keeps it held out: there point data.path at held-out text; its sequences 0..n-1 are read.
SYNTHETIC_PPL_OFFSET = 1 << 30


@dataclass(frozen=True)
class _Mesh:
    """This process's coordinates and groups (all None / size 1 in a single process)."""

    tp_rank: int = 0
    tp_group: Any = None
    cp_size: int = 1
    cp_rank: int = 0
    cp_group: Any = None
    dp_size: int = 1
    dp_rank: int = 0
    dp_group: Any = None
    dp_cp_group: Any = None
    device: torch.device = torch.device("cpu")

    @classmethod
    def of(cls, runtime: Optional[ParallelRuntime]) -> "_Mesh":
        if runtime is None:
            return cls()
        return cls(tp_rank=runtime.tp_rank, tp_group=runtime.tp_group, cp_size=runtime.dims.cp,
                   cp_rank=runtime.cp_rank, cp_group=runtime.cp_group, dp_size=runtime.dims.dp,
                   dp_rank=runtime.dp_rank, dp_group=runtime.dp_group,
                   dp_cp_group=runtime.dp_cp_group, device=runtime.device)


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def perplexity_indices(data: DataConfig, n: int) -> list[int]:
    """The global sample indices of the `n` perplexity sequences (see SYNTHETIC_PPL_OFFSET)."""
    start = SYNTHETIC_PPL_OFFSET if data.source == "synthetic" else 0
    return list(range(start, start + n))


def _score_prompts(forward: Forward, cfg: EvalRunConfig, mesh: _Mesh) -> list[dict[str, Any]]:
    ev = cfg.eval
    tok = load_tokenizer(cfg.data.tokenizer)
    prompts = [(length, depth, i, p)
               for length in ev.lengths for depth in ev.depths
               for i, p in enumerate(make_eval_prompts(ev.task, length=length, depth=depth,
                                                       n=ev.samples, seed=ev.seed,
                                                       tokenizer=tok))]
    answers = [tok.encode(p.answer) for *_, p in prompts]
    starts = [0]
    for a in answers:
        starts.append(starts[-1] + len(a))
    # every prompt's predicted answer ids at its slice; each DP replica fills its own prompts
    pred_flat = torch.zeros(starts[-1], dtype=torch.long, device=mesh.device)
    for k in range(mesh.dp_rank, len(prompts), mesh.dp_size):
        pred = predict_answer(forward, prompts[k][3].ids, answers[k], pad_id=tok.pad_id,
                              cp_size=mesh.cp_size, cp_rank=mesh.cp_rank,
                              cp_group=mesh.cp_group, tp_rank=mesh.tp_rank,
                              tp_group=mesh.tp_group, device=mesh.device)
        pred_flat[starts[k]:starts[k + 1]] = torch.tensor(pred, device=mesh.device)
    pred_flat = _all_reduce(pred_flat, mesh.dp_group).cpu()
    records = []
    for k, (length, depth, i, p) in enumerate(prompts):
        pred = pred_flat[starts[k]:starts[k + 1]].tolist()
        records.append({"length": length, "depth": depth, "index": i, "answer": p.answer,
                        "prediction": tok.decode(pred), "correct": pred == answers[k]})
    return records


def _perplexity(forward: Forward, loss_sum: LossSum, cfg: EvalRunConfig, mesh: _Mesh
                ) -> list[dict[str, Any]]:
    log = get_logger()
    tok = load_tokenizer(cfg.data.tokenizer)
    out = []
    for length in cfg.eval.perplexity_lengths:
        data = dataclasses.replace(cfg.data, seq_len=length)
        indices = perplexity_indices(data, cfg.eval.perplexity_samples)
        sums = torch.zeros(2, dtype=torch.float64, device=mesh.device)
        cursor = stream_cursor(data)
        for index in indices[mesh.dp_rank::mesh.dp_size]:
            seq_bn, doc_bn = global_batch(data, [index], cursor=cursor)
            nll, count = sequence_nll(forward, loss_sum, seq_bn, doc_bn=doc_bn, pad_id=tok.pad_id,
                                      cp_size=mesh.cp_size, cp_rank=mesh.cp_rank,
                                      device=mesh.device)
            sums += torch.tensor([nll, count], dtype=torch.float64, device=mesh.device)
        nll_sum, count = _all_reduce(sums, mesh.dp_cp_group).tolist()
        mean = nll_sum / max(count, 1.0)
        out.append({"length": length, "sequences": len(indices), "tokens": int(count),
                    "nll": mean, "ppl": math.exp(mean)})
        log.info("perplexity at %d tokens: %.4f (%d tokens)", length, math.exp(mean), int(count))
    return out


def evaluate_with(forward: Forward, *, cfg: EvalRunConfig, loss_sum: LossSum,
                  runtime: Optional[ParallelRuntime] = None) -> dict[str, Any]:
    """Score every prompt of the grid and the perplexity sequences with `forward` (see
    `scoring.Forward`); a collective over `runtime`'s groups (None: one process).

    Returns {"prompts": [{length, depth, index, answer, prediction, correct}], "perplexity":
    [{length, sequences, tokens, nll, ppl}]}, identical on every rank.
    """
    mesh = _Mesh.of(runtime)
    log = get_logger()
    prompts = _score_prompts(forward, cfg, mesh)
    log.info("%s: %d of %d prompts correct", cfg.eval.task, sum(r["correct"] for r in prompts),
             len(prompts))
    return {"prompts": prompts, "perplexity": _perplexity(forward, loss_sum, cfg, mesh)}


def evaluate_rank(cfg: EvalRunConfig, runtime: ParallelRuntime) -> dict[str, Any]:
    """Load `cfg.checkpoint` as this rank's TP shard and run `evaluate_with` on it (every rank
    of the world calls this; the result is the same everywhere)."""
    if cfg.checkpoint is None:
        raise ValueError("checkpoint is not set")
    model_cfg, rope = read_model_source(cfg.checkpoint)
    model = make_model(model_cfg, rope, cfg.attention, runtime=runtime, precision=cfg.precision)
    load_weights(model, cfg.checkpoint)
    model.eval()
    ctx = attention_context(runtime)

    def forward(mb: MicroBatch, seq_len: int) -> torch.Tensor:
        return model(mb.tokens_bt, positions_bt=mb.positions_bt, doc_ids_bt=mb.doc_ids_bt,
                     seq_len=seq_len, ctx=ctx)

    with torch.no_grad():
        return evaluate_with(forward, cfg=cfg, loss_sum=token_loss_sum, runtime=runtime)
