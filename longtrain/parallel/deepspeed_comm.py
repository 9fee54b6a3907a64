"""DeepSpeed's communication layer on the torch.distributed world (Ulysses' DistributedAttention
and the ZeRO optimizer need it), started on first use in each process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def ensure_deepspeed_comm() -> None:
    """Start deepspeed.comm on the existing torch.distributed world unless it runs already
    (deepspeed.comm keeps that state itself: no flag of ours)."""
    if not torch.cuda.is_available():
        # read by DeepSpeed when it is first imported
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
