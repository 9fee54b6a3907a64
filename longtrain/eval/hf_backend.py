"""`eval.backend=transformers`: the same prompts, scoring and perplexity with transformers'
AutoModelForCausalLM in this process (float32, CPU, one process, no Ray).

This is the check that an exported Hugging Face directory reproduces our accuracy outside
longtrain: only the forward pass differs from the longtrain backend.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from longtrain.config.eval_schema import EvalRunConfig
from longtrain.data.loader import IGNORE_INDEX, MicroBatch
from longtrain.eval.runner import evaluate_with


def _loss_sum(logits_btv: torch.Tensor, labels_bt: torch.Tensor) -> torch.Tensor:
    """Sum of token NLL over labels != IGNORE_INDEX (full-vocabulary logits [B, T, V])."""
    return F.cross_entropy(logits_btv.float().flatten(0, 1), labels_bt.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _document_spans(doc_t: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of equal document ids in a [T] row."""
    cuts = [0] + (torch.nonzero(doc_t[1:] != doc_t[:-1]).flatten() + 1).tolist() + [len(doc_t)]
    return list(zip(cuts[:-1], cuts[1:]))


def evaluate_transformers(cfg: EvalRunConfig) -> dict[str, Any]:
    """`evaluate_with` on transformers' model of the Hugging Face directory `cfg.checkpoint`.

    Packed perplexity documents are run one at a time (transformers has no document mask),
    which is what the document mask computes.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.checkpoint, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()

    def forward(mb: MicroBatch, seq_len: int) -> torch.Tensor:
        if mb.doc_ids_bt is None:
            return model(input_ids=mb.tokens_bt, position_ids=mb.positions_bt).logits
        rows = []
        for tokens_t, doc_t in zip(mb.tokens_bt, mb.doc_ids_bt):
            rows.append(torch.cat([model(input_ids=tokens_t[None, a:b]).logits[0]
                                   for a, b in _document_spans(doc_t)]))
        return torch.stack(rows)

    with torch.no_grad():
        return evaluate_with(forward, cfg=cfg, loss_sum=_loss_sum, runtime=None)
