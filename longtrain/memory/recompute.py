"""Activation recomputation (`memory.checkpointing`), RNG-correct.

On CUDA this is megatron-core's `tensor_parallel.checkpoint`, which restores the CPU, CUDA and
model-parallel RNG tracker states before recomputing; on CPU (where megatron's version asks
for CUDA RNG state) torch's reentrant checkpoint, which restores the CPU RNG state. Both are
reentrant: the function's inputs are saved with `save_for_backward`, so an ActivationStore
stores them (int8 under memory.activations=int8), and the forward inside runs without saving
anything.
"""

from __future__ import annotations

from typing import Callable

import torch


def checkpointed(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """fn(*args), keeping only args for the backward, which recomputes fn."""
    if any(a.is_cuda for a in args):
        from megatron.core.tensor_parallel import checkpoint

        return checkpoint(fn, False, *args)
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    return torch_checkpoint(fn, *args, use_reentrant=True, preserve_rng_state=True)
