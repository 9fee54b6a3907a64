"""Token-level cross entropy on vocabulary-parallel logits.

The loss of a step is (sum of token losses over every CP x DP rank and micro-batch) /
(global summed target weight: the number of targets unless data.answer_loss_weight weighs
the answers), so every TP / CP / DP layout of the same batch gives the
same loss and gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from longtrain.data.loader import IGNORE_INDEX


def token_loss_sum(logits_btv: torch.Tensor, labels_bt: torch.Tensor,
                   weights_bt: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of per-token losses (float32 scalar) over targets != IGNORE_INDEX, each times its
    weight when `weights_bt` [B, T] is given.

    logits: this TP rank's vocabulary shard [B, T, V/tp]; labels: [B, T] global token ids.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    valid = labels_bt != IGNORE_INDEX
    target = torch.where(valid, labels_bt, torch.zeros_like(labels_bt))
    # megatron's CE works in place on its input: hand it a float32 copy it may own.
    logits = logits_btv.float()
    if logits.data_ptr() == logits_btv.data_ptr():
        logits = logits.clone()
    losses_bt = vocab_parallel_cross_entropy(logits, target)
    if weights_bt is not None:
        losses_bt = losses_bt * weights_bt
    return (losses_bt * valid).sum()


def reduce_sum(value: float | torch.Tensor, *, group, device: torch.device) -> float:
    """Sum of a scalar over a process group, in float64 (token counts, loss sums)."""
    t = torch.as_tensor(value, dtype=torch.float64, device=device).detach().clone().reshape(1)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return float(t.item())
