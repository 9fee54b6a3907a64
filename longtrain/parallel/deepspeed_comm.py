"""DeepSpeed's communication layer, initialized once per process on the torch.distributed
world (Ulysses' DistributedAttention and the ZeRO optimizer need it)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

_READY = False


def ensure_deepspeed_comm() -> None:
    global _READY
    if _READY:
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    _READY = True
