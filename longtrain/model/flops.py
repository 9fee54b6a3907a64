"""FLOPs of one training step of a run config, for MFU: the formulas of
`longtrain.observability.flops` summed over the layer plan (each layer's backend counts its
own attention)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from longtrain.attention.plan import plan_layers
from longtrain.model.llama import ModelShape


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one optimizer step over the whole world (all sequences of the global batch)."""

    matmul: float
    attention: float

    @property
    def total(self) -> float:
        return self.matmul + self.attention


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
    for layer in plan_layers(cfg.attention, m):
        per_token += 2.0 * h * (hq + 2 * hkv) * d + 2.0 * hq * d * h + 6.0 * h * m.intermediate_size
        if layer.kind == "linear":
            # the linear layer's output gate
            per_token += 2.0 * h * hq * d
        attention += layer.spec.forward_flops(t=t, heads=hq, head_dim=d, attention=cfg.attention)
    return StepFlops(matmul=3.0 * per_token * t * n_seq, attention=3.0 * attention * n_seq)
