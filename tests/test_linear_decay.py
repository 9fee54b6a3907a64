"""Lightning Attention's decay rates: ALiBi's slopes for any head count, and TransNormerLLM's
per-layer scaling (model.linear_decay=slopes_by_layer)."""

from __future__ import annotations

import math

import pytest
import torch

from longtrain.attention.linear import alibi_slopes, head_log_decay


def _reference_slopes(n: int) -> list[float]:
    """ALiBi's construction as its paper states it: a geometric sequence starting at
    2^(-8/n) with that ratio; for n not a power of two, the closest power of two's sequence
    extended by the even-indexed slopes of twice that power (recursively)."""
    if math.log2(n).is_integer():
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    closest = 2 ** math.floor(math.log2(n))
    return _reference_slopes(closest) + _reference_slopes(2 * closest)[0::2][:n - closest]


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 6, 8, 12, 20, 24, 32, 40, 48, 64, 96])
def test_slopes_follow_alibi_for_every_head_count(heads):
    assert alibi_slopes(heads) == pytest.approx(_reference_slopes(heads), rel=1e-12)
    assert torch.equal(head_log_decay(heads, "slopes"),
                       -torch.tensor(_reference_slopes(heads), dtype=torch.float64).float())


def test_twelve_heads_interleave_instead_of_spreading_evenly():
    # the even spread 2^(-8h/12) is what longtrain computed before; ALiBi interleaves
    even = [2.0 ** (-8.0 * h / 12) for h in range(1, 13)]
    assert alibi_slopes(12)[:8] == pytest.approx([2.0 ** (-i) for i in range(1, 9)])
    assert alibi_slopes(12)[8:] == pytest.approx([2.0 ** (-(2 * i - 1) / 2) for i in range(1, 5)])
    assert alibi_slopes(12) != pytest.approx(even)


def test_slopes_by_layer_scale_from_one_to_almost_zero():
    layers = 6
    base = -head_log_decay(16, "slopes")
    for layer in range(layers):
        scaled = -head_log_decay(16, "slopes_by_layer", layer=layer, num_layers=layers)
        factor = 1 - layer / (layers - 1) + 1e-5
        assert torch.allclose(scaled, base * factor, rtol=1e-6, atol=0)
    assert head_log_decay(4, "slopes_by_layer", layer=0, num_layers=1).tolist() == \
        pytest.approx((-torch.tensor(alibi_slopes(4)) * (1 + 1e-5)).tolist())
    assert torch.equal(head_log_decay(7, "none"), torch.zeros(7))
    with pytest.raises(ValueError, match="model.linear_decay='alibi'"):
        head_log_decay(4, "alibi")


def _decay_worker(runtime, out_path: str) -> None:
    from longtrain.config.schema import RunConfig
    from longtrain.train.build import make_model

    cfg = RunConfig()
    cfg.model.num_layers, cfg.model.layer_pattern = 3, "L"
    cfg.model.linear_decay = "slopes_by_layer"
    cfg.attention.backend = "lasp2"
    model = make_model(cfg.model, cfg.rope, cfg.attention, runtime=runtime, precision="fp32")
    torch.save({"heads": cfg.model.num_heads,
                "decays": [layer.attn.log_decay.clone() for layer in model.layers]}, out_path)


def test_each_linear_layer_holds_its_own_rates(tmp_path):
    from longtrain.parallel.spawn import run_distributed

    path = str(tmp_path / "decays.pt")
    run_distributed(_decay_worker, world_size=1, args=(path,))
    got = torch.load(path, weights_only=True)
    assert len(got["decays"]) == 3
    for i, decay in enumerate(got["decays"]):
        assert torch.equal(decay, head_log_decay(got["heads"], "slopes_by_layer", layer=i,
                                                 num_layers=3))
