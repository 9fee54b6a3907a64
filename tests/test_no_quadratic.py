"""No tensor of a training step's forward and backward grows with the square of the sequence:
every op's outputs are recorded by a dispatch hook during one micro-batch of packed documents
(16 per sequence, crossing the CP ranks' boundaries), and a tensor with two dimensions as long
as this rank's share of the sequence is a failure. The model's other dimensions (vocabulary,
hidden, MLP, heads) are kept well below that length, so only a [T, T]-like tensor stands out.
The parity canary checks the first softmax layer within the same step (and finds it exact)."""

from __future__ import annotations

import pytest
import torch

from longtrain.parallel.spawn import run_distributed

LENGTH = 2048
DOCS = 16


class QuadraticWatch:
    """Records every op output (as "op: shape") with two dimensions >= `threshold`, or with
    at least `threshold`^2 elements in all (a [T, T] block cut into tiles)."""

    def __init__(self, threshold: int) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        watch = self
        self.threshold, self.found = threshold, []

        def quadratic(t: torch.Tensor) -> bool:
            return (sum(n >= threshold for n in t.shape) >= 2
                    or t.numel() >= threshold * threshold)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in (out if isinstance(out, (tuple, list)) else [out]):
                    if isinstance(t, torch.Tensor) and quadratic(t):
                        watch.found.append(f"{func}: {tuple(t.shape)}")
                return out

        self.mode = Mode()


def _packed_docs(length: int, gen: torch.Generator) -> torch.Tensor:
    cuts = sorted(torch.randperm(length - 1, generator=gen)[:DOCS - 1].add(1).tolist())
    doc = torch.zeros(length, dtype=torch.long)
    for c in cuts:
        doc[c:] += 1
    return doc[None]


def _worker(runtime, backend: str, softmax: str, pattern: str, out_path: str) -> None:
    from longtrain.attention import canary as canary_module
    from longtrain.config.schema import RunConfig
    from longtrain.parallel.layout import split_for_cp
    from longtrain.train.build import attention_context, build_model
    from longtrain.train.loss import chunked_loss_sum

    cfg = RunConfig()
    # every other dimension small: the largest activation is [T/cp, 256] (qkv), a quarter of
    # the watch's element bound at T/cp = 1024
    cfg.model.vocab_size, cfg.model.intermediate_size = 256, 128
    cfg.model.num_layers, cfg.model.layer_pattern = 2, pattern
    cfg.attention.backend, cfg.attention.softmax = backend, softmax
    cfg.parallel.world_size, cfg.parallel.cp = runtime.dims.world_size, runtime.dims.cp
    cfg.train.loss_chunk = 256
    model = build_model(cfg, runtime)
    # the parity canary runs in the step too (its constant-size [H, sampled rows, key chunk]
    # scores bounded below the watch's bound)
    canary_module.SCORE_ELEMENTS = 1 << 16
    canary = canary_module.install(model)
    canary.arm(tol=None)
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 256, (1, LENGTH), generator=gen)
    doc = _packed_docs(LENGTH, gen)
    positions = torch.arange(LENGTH)[None]
    shard = lambda x: split_for_cp(x, cp_size=runtime.dims.cp, cp_rank=runtime.cp_rank)  # noqa: E731
    local = LENGTH // runtime.dims.cp
    watch = QuadraticWatch(threshold=local // 2 + local // 4)
    with watch.mode:
        hidden = model(shard(tokens), positions_bt=shard(positions), doc_ids_bt=shard(doc),
                       seq_len=LENGTH, ctx=attention_context(runtime), head=False)
        loss = chunked_loss_sum(model.logits, hidden, shard(tokens), chunk=cfg.train.loss_chunk)
        loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert canary.last_error is not None and canary.last_error < 1e-5, canary.last_error
    torch.save(watch.found, f"{out_path}.{runtime.rank}")


# (backend, attention.softmax, model.layer_pattern, cp)
CASES = [
    ("dense", "allgather", "", 1),
    ("ring", "allgather", "", 2),
    ("ulysses", "allgather", "", 2),
    ("allgather", "allgather", "", 2),
    ("lasp2", "allgather", "LS", 2),
    ("lasp2", "ring", "LS", 2),
    ("s2", "allgather", "", 2),
    ("ulysses_ring", "allgather", "", 4),
]


@pytest.mark.parametrize("backend,softmax,pattern,cp", CASES,
                         ids=[f"{b}-{s}-{p or 'all'}-cp{c}" for b, s, p, c in CASES])
def test_no_tensor_is_quadratic_in_the_sequence(tmp_path, backend, softmax, pattern, cp):
    path = str(tmp_path / "found")
    run_distributed(_worker, world_size=cp, cp=cp, args=(backend, softmax, pattern, path),
                    cp_sizes=(2, cp // 2) if backend == "ulysses_ring" else None)
    for rank in range(cp):
        found = torch.load(f"{path}.{rank}", weights_only=True)
        assert found == [], f"rank {rank}: tensors quadratic in the sequence: {found[:5]}"


def test_the_watch_sees_a_quadratic_tensor():
    watch = QuadraticWatch(threshold=100)
    with watch.mode:
        q = torch.randn(1, 2, 200, 8)
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch.ones(200, 300).sum()
        torch.ones(8, 50, 50).sum()  # 20000 elements: a [T, T] cut into tiles
        torch.ones(4, 50, 40).sum()  # 8000: below the bound
    assert any("(200, 300)" in f for f in watch.found)
    assert any("(8, 50, 50)" in f for f in watch.found)
    assert not any("(4, 50, 40)" in f for f in watch.found)
