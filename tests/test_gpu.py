"""The model and the training loop on a CUDA device (NCCL), against the CPU computation.

Skipped where no GPU is present (CI); run with `pytest -m gpu` on a GPU machine.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import BF16_RTOL, rel_err
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
    run.checkpoint.resume, run.checkpoint.every, run.checkpoint.save_final = "never", 0, False
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


def _ring_on_cuda(runtime, out_path: str) -> None:
    from attention_reference import random_docs, reference_attention
    from longtrain.attention.ring import ring_attention_fn

    gen = torch.Generator().manual_seed(7)
    b, t, hq, hkv, d = 2, 1000, 8, 2, 64
    q, k, v, dout = (torch.randn(b, t, h, d, generator=gen) for h in (hq, hkv, hkv, hq))
    doc = random_docs(b, t, gen=gen)
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*ref_in, causal=True, doc_bt=doc)
    ref.backward(dout.double())
    mine = [x.to(runtime.device, torch.bfloat16).requires_grad_() for x in (q, k, v)]
    out = ring_attention_fn(*mine, group=runtime.cp_group, causal=True,
                            doc_bt=doc.to(runtime.device))
    out.backward(dout.to(runtime.device, torch.bfloat16))
    errs = {"out": rel_err(out.float().cpu(), ref.detach())}
    for n, x, r in zip("qkv", mine, ref_in):
        errs[f"d{n}"] = rel_err(x.grad.float().cpu(), r.grad)
    torch.save(errs, out_path)


def test_ring_blocks_run_on_the_triton_kernel(tmp_path):
    from longtrain_kernels.flash_attn import available

    assert available()
    out = os.path.join(tmp_path, "ring.pt")
    run_distributed(_ring_on_cuda, world_size=1, backend="nccl", args=(out,))
    errs = torch.load(out, weights_only=True)
    assert max(errs.values()) < BF16_RTOL, errs
