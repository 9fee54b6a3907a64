"""The model and the training loop on a CUDA device (NCCL), against the CPU computation.

Skipped where no GPU is present (CI); run with `pytest -m gpu` on a GPU machine.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import rel_err
from longtrain.parallel.spawn import run_distributed

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _cuda_vs_cpu(runtime, out_path: str) -> None:
    from longtrain.attention.base import get_attention
    from longtrain.config.schema import ModelConfig, RopeConfig, RunConfig
    from longtrain.model.llama import LlamaModel
    from longtrain.model.sharding import canonical_state_dict, init_weights
    from longtrain.train.loop import train

    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = ModelConfig(vocab_size=301, qkv_bias=True)
    rope = RopeConfig(scaling="yarn", factor=2.0, original_max_position_embeddings=64)
    tokens = torch.randint(0, 301, (2, 128), generator=torch.Generator().manual_seed(0))
    # A random linear objective, not cross entropy: the CPU copy runs in an NCCL world, where
    # megatron's vocab-parallel CE would all-reduce a CPU tensor (TP=1 layers do not).
    weight = torch.randn(2, 128, 301, generator=torch.Generator().manual_seed(1))
    results = {}
    for device in (torch.device("cpu"), runtime.device):
        model = LlamaModel(cfg, rope, attention=get_attention("dense"), tp=1, tp_rank=0,
                           device=device)
        init_weights(model, seed=3)
        logits = model(tokens.to(device))
        (logits * weight.to(device)).sum().backward()
        grads = canonical_state_dict(model, grads=True)
        results[device.type] = (logits.detach().cpu(), {k: g.cpu() for k, g in grads.items()})

    run = RunConfig()
    run.parallel.world_size = 1
    run.train.precision = "bf16"
    run.train.steps = 30
    run.data.seq_len = 512
    losses = [m["loss"] for m in train(run, runtime)]
    torch.save({"results": results, "losses": losses}, out_path)


def test_model_and_training_on_cuda_match_cpu(tmp_path):
    out = os.path.join(tmp_path, "gpu.pt")
    run_distributed(_cuda_vs_cpu, world_size=1, backend="nccl", args=(out,))
    saved = torch.load(out, weights_only=True)
    (cpu_logits, cpu_grads), (gpu_logits, gpu_grads) = saved["results"]["cpu"], saved["results"]["cuda"]
    assert rel_err(gpu_logits, cpu_logits) < 1e-4
    for name, grad in cpu_grads.items():
        assert rel_err(gpu_grads[name], grad) < 1e-3, name
    losses = saved["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
