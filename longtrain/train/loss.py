"""Token-level cross entropy on vocabulary-parallel logits.

The loss of a step is (sum of token losses over every CP x DP rank and micro-batch) /
(global summed target weight: the number of targets unless data.answer_loss_weight weighs
the answers), so every TP / CP / DP layout of the same batch gives the
same loss and gradients. The training loop computes it chunk by chunk with the LM head
(`chunked_loss_sum`, `train.loss_chunk`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from longtrain.data.loader import IGNORE_INDEX
from longtrain.memory.recompute import checkpointed


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


def chunked_loss_sum(head: Callable[[torch.Tensor], torch.Tensor], hidden_bth: torch.Tensor,
                     labels_bt: torch.Tensor, weights_bt: Optional[torch.Tensor] = None, *,
                     chunk: int) -> torch.Tensor:
    """`token_loss_sum(head(hidden), labels, weights)`, computed over chunks of `chunk`
    positions (0: one chunk), each chunk's logits recomputed in the backward: the logits and
    their float32 copy exist for one chunk at a time, forward and backward, whatever the
    sequence length. `head` maps final-norm outputs [B, t, H] to vocabulary-parallel logits
    (`LlamaModel.logits`)."""
    t = hidden_bth.shape[1]
    if chunk <= 0 or chunk >= t:
        return token_loss_sum(head(hidden_bth), labels_bt, weights_bt)
    total = hidden_bth.new_zeros((), dtype=torch.float32)
    for start in range(0, t, chunk):
        cut = slice(start, min(start + chunk, t))
        labels, weights = labels_bt[:, cut], None if weights_bt is None else weights_bt[:, cut]

        def part(h_bth: torch.Tensor, labels: torch.Tensor = labels,
                 weights: Optional[torch.Tensor] = weights) -> torch.Tensor:
            return token_loss_sum(head(h_bth), labels, weights)

        total = total + (checkpointed(part, hidden_bth[:, cut]) if torch.is_grad_enabled()
                         else part(hidden_bth[:, cut]))
    return total


def reduce_sum(value: float | torch.Tensor, *, group, device: torch.device) -> float:
    """Sum of a scalar over a process group, in float64 (token counts, loss sums)."""
    t = torch.as_tensor(value, dtype=torch.float64, device=device).detach().clone().reshape(1)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return float(t.item())
