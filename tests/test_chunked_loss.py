"""The chunked loss (`train.loss_chunk`): the LM head and the vocabulary-parallel cross-entropy
over chunks of positions, each recomputed in the backward, equal to the whole-sequence loss
in value and in every gradient; and the logits never exist for more than one chunk."""

from __future__ import annotations

import torch

from longtrain.parallel.spawn import run_distributed


def _loss_and_grads(runtime, chunk: int, seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    from longtrain.config.schema import RunConfig
    from longtrain.model.sharding import canonical_state_dict, init_weights
    from longtrain.train.build import attention_context, make_model
    from longtrain.train.loss import chunked_loss_sum

    cfg = RunConfig()
    # 259 is not a multiple of tp=2: the last rank's padded logit column is masked
    cfg.model.vocab_size, cfg.model.num_layers = 259, 2
    model = make_model(cfg.model, cfg.rope, cfg.attention, runtime=runtime, precision="fp32")
    init_weights(model, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, 259, (2, 45), generator=gen)
    labels = torch.randint(0, 259, (2, 45), generator=gen)
    labels[0, :5] = -100
    weights = torch.rand(2, 45, generator=gen)
    hidden = model(tokens, ctx=attention_context(runtime), head=False)
    loss = chunked_loss_sum(model.logits, hidden, labels, weights, chunk=chunk)
    loss.backward()
    return float(loss), canonical_state_dict(model, grads=True)


def _worker(runtime, out_path: str) -> None:
    seed = 11
    got = {chunk: _loss_and_grads(runtime, chunk, seed) for chunk in (0, 7, 16, 45)}
    if runtime.rank == 0:
        torch.save(got, out_path)


def _check(path: str) -> None:
    got = torch.load(path, weights_only=True)
    loss0, grads0 = got[0]
    for chunk in (7, 16, 45):
        loss, grads = got[chunk]
        assert abs(loss - loss0) <= 1e-5 * abs(loss0), (chunk, loss, loss0)
        assert grads.keys() == grads0.keys()
        for name, g in grads.items():
            ref = grads0[name]
            assert torch.allclose(g, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item()), \
                (chunk, name, (g - ref).abs().max().item())


def test_chunked_loss_equals_the_whole_sequence_loss_and_gradients(tmp_path):
    path = str(tmp_path / "one.pt")
    run_distributed(_worker, world_size=1, args=(path,))
    _check(path)


def test_chunked_loss_under_tensor_parallelism_with_a_padded_vocabulary(tmp_path):
    path = str(tmp_path / "tp2.pt")
    run_distributed(_worker, world_size=2, tp=2, args=(path,))
    _check(path)


def _peak_worker(runtime, out_path: str) -> None:
    """The largest logits-shaped tensor (last dimension the vocabulary) the loss's forward and
    backward create, seen by a dispatch hook on every op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from longtrain.config.schema import RunConfig
    from longtrain.model.sharding import init_weights
    from longtrain.train.build import attention_context, make_model
    from longtrain.train.loss import chunked_loss_sum

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == 4096:
                    self.numel = max(self.numel, t.numel())
            return out

    cfg = RunConfig()
    cfg.model.vocab_size, cfg.model.num_layers = 4096, 1
    model = make_model(cfg.model, cfg.rope, cfg.attention, runtime=runtime, precision="fp32")
    init_weights(model, seed=3)
    # sizes that tell the logits apart from the head's weight [4096, 128] (and its transpose)
    t = 512
    tokens = torch.randint(0, 4096, (1, t))
    result = {}
    for chunk in (0, 128):
        hidden = model(tokens, ctx=attention_context(runtime), head=False).detach()
        hidden.requires_grad_(True)
        with Largest() as mode:
            chunked_loss_sum(model.logits, hidden, tokens, chunk=chunk).backward()
        result[chunk] = mode.numel
    torch.save(result, out_path)


def test_the_logits_exist_one_chunk_at_a_time(tmp_path):
    path = str(tmp_path / "peak.pt")
    run_distributed(_peak_worker, world_size=1, args=(path,))
    got = torch.load(path, weights_only=True)
    # whole sequence: the [1, 512, 4096] logits; chunked: [1, 128, 4096] at most (the head's
    # weight and its gradient, 128 x 4096, are the same size: no logits tensor is larger)
    assert got[0] == 512 * 4096
    assert got[128] == 128 * 4096


def test_a_bad_loss_chunk_is_named_before_any_worker_starts():
    from longtrain.config.schema import RunConfig
    from longtrain.planning.validate import problems

    cfg = RunConfig()
    assert not [p for p in problems(cfg) if "loss_chunk" in p]
    cfg.train.loss_chunk = -1
    assert any("train.loss_chunk=-1 must be an integer >= 0" in p for p in problems(cfg))
