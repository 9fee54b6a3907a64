"""Checkpoint chunks without a process group: a flat range is the rectangles it covers, and
the canonical views of every (TP rank, ZeRO partition) of a model hold exactly the canonical
tensors' values, each element once per rank that keeps a copy (fused q/k/v and gate/up, row-
and column-parallel weights, biases, linear layers, vocabulary padding, tied embeddings)."""

from __future__ import annotations

import random
import types

import pytest
import torch

from longtrain.checkpoint.chunks import Fragment, Rect, flat_rects
from longtrain.checkpoint.native import canonical_views
from longtrain.config.schema import ModelConfig
from longtrain.model.llama import ModelShape, layer_kinds
from longtrain.model.sharding import canonical_shapes, shard_specs


@pytest.mark.parametrize("shape,start,numel", [
    ((5, 7), 0, 35), ((5, 7), 3, 2), ((5, 7), 3, 4), ((5, 7), 3, 30), ((5, 7), 7, 14),
    ((5, 7), 34, 1), ((11,), 4, 5), ((5, 7), 10, 0)])
def test_a_flat_range_is_the_rectangles_it_covers(shape, start, numel) -> None:
    full = torch.arange(torch.Size(shape).numel()).view(shape)
    covered = torch.zeros(shape, dtype=torch.int64)
    flat = full.reshape(-1)[start:start + numel]
    rects = flat_rects(shape, start, numel)
    assert len(rects) <= 3
    for rect, offset in rects:
        n = 1
        for length in rect.lengths:
            n *= length
        piece = flat[offset:offset + n].view(rect.lengths)
        assert torch.equal(rect.view(full, origin=Rect.whole(shape)), piece)
        rect.view(covered, origin=Rect.whole(shape)).add_(1)
    expected = torch.zeros(torch.Size(shape).numel(), dtype=torch.int64)
    expected[start:start + numel] = 1
    assert torch.equal(covered.reshape(-1), expected)


def test_fragments_of_3d_tensors_are_refused() -> None:
    with pytest.raises(ValueError, match="3-D"):
        flat_rects((2, 3, 4), 1, 5)


def _model(cfg: ModelConfig, tp: int, rank: int) -> types.SimpleNamespace:
    """What canonical_views reads of a model: its config, TP shape, rank and layer kinds."""
    return types.SimpleNamespace(cfg=cfg, shape=ModelShape(cfg, tp), tp_rank=rank,
                                 layer_kinds=layer_kinds(cfg))


def _tp_local(spec, full: dict[str, torch.Tensor], *, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's local tensor of `spec`: each piece's torch.chunk share along the TP
    dimension (zero rows where the vocabulary is padded), concatenated."""
    if spec.dim is None:
        return full[spec.pieces[0]]
    parts = []
    for name in spec.pieces:
        t = full[name]
        per = -(-t.shape[spec.dim] // tp)
        lo = min(rank * per, t.shape[spec.dim])
        part = t.narrow(spec.dim, lo, min(per, t.shape[spec.dim] - lo))
        pad = list(part.shape)
        pad[spec.dim] = per - part.shape[spec.dim]
        parts.append(torch.cat([part, torch.zeros(pad, dtype=t.dtype)], spec.dim))
    return torch.cat(parts, spec.dim)


@pytest.mark.parametrize("tp,partitions", [(1, 1), (1, 3), (2, 2), (2, 7), (4, 3)])
@pytest.mark.parametrize("cfg", [
    ModelConfig(vocab_size=509, hidden_size=16, intermediate_size=24, num_layers=2,
                num_heads=4, num_kv_heads=2, qkv_bias=True, layer_pattern="LS"),
    ModelConfig(vocab_size=5, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=4,
                num_kv_heads=4, tie_embeddings=True)], ids=["bias-linear", "tiny-vocab-tied"])
def test_zero_fragments_of_every_rank_cover_the_canonical_tensors(cfg, tp, partitions) -> None:
    rng = random.Random(tp * 100 + partitions)
    shapes = canonical_shapes(_model(cfg, tp, 0))
    full = {name: torch.randn(shape, dtype=torch.float64) for name, shape in shapes.items()}
    covered = {name: torch.zeros(shape, dtype=torch.int64) for name, shape in shapes.items()}
    for rank in range(tp):
        model = _model(cfg, tp, rank)
        specs = shard_specs(model)
        local = {s.local_name: _tp_local(s, full, tp=tp, rank=rank) for s in specs}
        # DeepSpeed flattens a rank's parameters into one buffer and cuts it into
        # `partitions` ranges, wherever the cuts fall
        sizes = [local[s.local_name].numel() for s in specs]
        total = sum(sizes)
        cuts = [0, *sorted(rng.sample(range(1, total), partitions - 1)), total]
        for lo, hi in zip(cuts, cuts[1:]):
            held, at = {}, 0
            for spec, size in zip(specs, sizes):
                a, b = max(lo, at), min(hi, at + size)
                flat = local[spec.local_name].reshape(-1)
                shape = tuple(local[spec.local_name].shape)
                held[spec.local_name] = (Fragment(shape, a - at, flat[a - at:b - at]) if a < b
                                         else Fragment(shape, 0, flat[:0]))
                at += size
            for name, chunked in canonical_views(model, held).items():
                assert tuple(chunked.size()) == shapes[name]
                for offsets, t in chunked.parts:
                    box = tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))
                    assert torch.equal(full[name][box], t), (name, offsets)
                    covered[name][box] += 1
    replicated = {n for s in shard_specs(_model(cfg, tp, 0)) if s.dim is None for n in s.pieces}
    for name, count in covered.items():
        # every element exactly once, or once per TP rank where each rank keeps a copy
        want = tp if name in replicated else 1
        assert bool((count == want).all()), (name, count.min(), count.max())
