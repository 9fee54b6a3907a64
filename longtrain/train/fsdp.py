"""`optim.zero=3`: fully sharded data parallelism over CP x DP, with torch FSDP2.

Why FSDP2 (`fully_shard`) and not DeepSpeed ZeRO-3 or megatron-core's FSDP:
- it shards the parameters of any module, so megatron-core's TP layers (whose weights are
  plain parameters holding this rank's TP shard) are sharded again over CP x DP as they are;
  the TP and SP communication in our forward is untouched;
- each sharded parameter is a DTensor with its own offsets, which the checkpoint writes and
  reads as chunks (`checkpoint.chunks`) in any other layout, with nothing gathered;
- it runs on gloo (CPU tests) and NCCL alike; megatron-core's FSDP and distributed optimizer
  need CUDA buffers, and DeepSpeed ZeRO-3 replaces `nn.Module` parameters with its own
  partitioned objects that our forward (and megatron's layers) would have to be taught.

Layout, as torchtitan does it: each decoder layer is one FSDP unit (its parameters are
all-gathered just before its forward, freed after it, gathered again for its backward, and
its gradients reduce-scattered as soon as they are complete); the root unit holds the
embedding, the final norm and the head. Layer i's forward prefetches layer i + 1's gather.

Precision: the sharded parameters are fp32 and are the optimizer's master weights; in bf16
runs FSDP gathers a bf16 copy for compute (`MixedPrecisionPolicy`), and gradients are
reduce-scattered in fp32 unless `optim.grad_reduce_dtype=param`.

Our loss is divided by the global target count, so gradients are summed over CP x DP: the
gradient divide factor is 1. Gradients are reduce-scattered after every micro-batch, as
ZeRO-3 does: a layer's unsharded gradients live until its backward ends, the root's (the
embedding's and the head's) until the whole backward does. The last layer stays gathered
from its forward to its backward, which follows at once (as torchtitan does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

# the tags megatron and our model put on parameters, which sharding must keep
_TAGS = ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel")


def shard_model(model: nn.Module, runtime: Any, *, reduce_dtype: str = "fp32") -> None:
    """Shard `model`'s parameters over the CP x DP ranks with FSDP2, in place: decoder layers
    (`model.layers`) as units, the rest in the root unit; the parameters become fp32
    DTensors (their tags kept), computed in the model's own dtype."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    compute = next(model.parameters()).dtype
    tags = {name: {t: getattr(p, t) for t in _TAGS if hasattr(p, t)}
            for name, p in model.named_parameters()}
    policy = MixedPrecisionPolicy(
        param_dtype=None if compute == torch.float32 else compute,
        reduce_dtype=torch.float32 if reduce_dtype == "fp32" else compute,
        cast_forward_inputs=False)
    mesh = DeviceMesh.from_group(runtime.dp_cp_group, runtime.device.type)
    layers = list(model.layers)
    # unit by unit: a unit's parameters become fp32 just before it is sharded, so the model
    # exists in fp32 one layer at a time, never whole
    for i, layer in enumerate(layers):
        _to_fp32(layer)
        # the last layer's backward comes right after its forward: no re-gather
        fully_shard(layer, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=i < len(layers) - 1)
    _to_fp32(model)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for layer, following in zip(layers, layers[1:]):
        layer.set_modules_to_forward_prefetch([following])
    for unit in (*layers, model):
        # a plain sum: no division, and no PREMUL_SUM (which gloo lacks)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    for name, p in model.named_parameters():
        for tag, value in tags[name].items():
            setattr(p, tag, value)


@torch.no_grad()
def _to_fp32(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dtype != torch.float32:
            p.data = p.data.float()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t
