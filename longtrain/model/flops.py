"""FLOPs of one training step of a run config, for MFU: the formulas of
`longtrain.observability.flops` summed over the layer plan (each layer's backend counts its
own attention).

With packed documents the exact softmax layers' useful work is the causal pairs within each
document, not the whole sequence's: `StepFlops.with_pairs` replaces the step's causal pairs
by the pairs the batch's documents hold (`observability.flops.pairs_of_positions`). Sparse
(s2) and linear layers keep their own counts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from longtrain.attention.dense import softmax_forward_flops
from longtrain.attention.plan import plan_layers
from longtrain.observability.flops import causal_pairs
from longtrain.model.llama import ModelShape


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one optimizer step over the whole world (all sequences of the global batch)."""

    matmul: float
    attention: float
    # of `attention`: FLOPs (forward + backward) per causal (query, key) pair, summed over the
    # layers that compute exact causal softmax attention
    per_pair: float = 0.0
    # the causal pairs of the step those layers are counted at (sequences x T (T + 1) / 2)
    pairs: float = 0.0

    @property
    def total(self) -> float:
        return self.matmul + self.attention

    def with_pairs(self, pairs: float) -> "StepFlops":
        """The same step with its exact softmax layers counted at `pairs` causal pairs (e.g.
        those within the packed documents of the batch) instead of `self.pairs`."""
        return dataclasses.replace(
            self, attention=self.attention + self.per_pair * (pairs - self.pairs), pairs=pairs)


def step_flops(cfg: Any, *, seq_len: int | None = None, sequences: int | None = None
               ) -> StepFlops:
    """FLOPs of one optimizer step of the run config (`data.batch_size` sequences of
    `data.seq_len` tokens unless given), forward + backward."""
    m = cfg.model
    t = seq_len or cfg.data.seq_len
    n_seq = sequences or cfg.data.batch_size
    d = ModelShape(m, 1).head_dim
    h, hq, hkv = m.hidden_size, m.num_heads, m.num_kv_heads
    per_token = 2.0 * h * m.vocab_size
    attention = 0.0
    per_pair = 0.0
    for layer in plan_layers(cfg.attention, m):
        per_token += 2.0 * h * (hq + 2 * hkv) * d + 2.0 * hq * d * h + 6.0 * h * m.intermediate_size
        if layer.kind == "linear":
            # the linear layer's output gate
            per_token += 2.0 * h * hq * d
        attention += layer.spec.forward_flops(t=t, heads=hq, head_dim=d, attention=cfg.attention)
        if layer.spec.forward_flops is softmax_forward_flops:
            # a length-1 sequence holds one causal pair
            per_pair += softmax_forward_flops(t=1, heads=hq, head_dim=d,
                                              attention=cfg.attention)
    return StepFlops(matmul=3.0 * per_token * t * n_seq, attention=3.0 * attention * n_seq,
                     per_pair=3.0 * per_pair, pairs=float(causal_pairs(t) * n_seq))
