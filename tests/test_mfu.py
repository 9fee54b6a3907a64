"""MFU as the field reports it: the datasheet peak by device name, `logging.peak_tflops`, the
measured-GEMM fallback said as such, and attention FLOPs counted within packed documents."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from longtrain.observability.peaks import (SOURCES, TABLE, choose_peak, find_device,
                                           source_words, spec_peak)


@pytest.mark.parametrize("name, label", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA B200", "B200"),
    ("NVIDIA GB200", "GB200"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA L40", "L40"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA A10G", "A10G"),
    ("NVIDIA A10", "A10"),
    ("Tesla V100-SXM2-32GB", "V100"),
    ("AMD Instinct MI300X", "MI300X"),
])
def test_device_names_find_their_row(name, label):
    assert find_device(name).label == label


def test_dense_peaks_per_dtype_and_unknown_devices():
    assert spec_peak("NVIDIA H100 80GB HBM3", torch.bfloat16) == (989.0, "H100 SXM bf16")
    assert spec_peak("NVIDIA H100 80GB HBM3", torch.float16) == (989.0, "H100 SXM bf16")
    assert spec_peak("NVIDIA H100 PCIe", torch.bfloat16) == (756.0, "H100 PCIe bf16")
    assert spec_peak("NVIDIA A100-SXM4-40GB", torch.bfloat16)[0] == 312.0
    assert spec_peak("NVIDIA B200", torch.bfloat16)[0] == 2250.0
    # fp32 matmuls: the non-tensor figure at PyTorch's default precision, TF32 when allowed
    assert spec_peak("NVIDIA H100 80GB HBM3", torch.float32) == (67.0, "H100 SXM fp32")
    assert spec_peak("NVIDIA H100 80GB HBM3", torch.float32,
                     fp32_matmul_precision="high") == (494.5, "H100 SXM tf32")
    # no bf16 tensor cores on a V100; no row for an unknown device
    assert spec_peak("Tesla V100-SXM2-16GB", torch.bfloat16) is None
    assert spec_peak("Some Future GPU 9000", torch.bfloat16) is None
    # dense, never the with-sparsity figure: no row above the B200's dense bf16 except GB200
    assert all(r.bf16 is None or r.bf16 <= 2500.0 for r in TABLE)


def test_denominator_config_then_spec_then_measured_gemm():
    h100 = "NVIDIA H100 80GB HBM3"
    got = choose_peak(configured=500.0, device_name=h100, dtype=torch.bfloat16,
                      measured_gemm=700.0)
    assert (got.tflops, got.source, got.label) == (500.0, "config", "config")
    got = choose_peak(configured=None, device_name=h100, dtype=torch.bfloat16,
                      measured_gemm=700.0)
    assert (got.tflops, got.source, got.label) == (989.0, "spec", "spec:H100 SXM bf16")
    for name in (None, "Some Future GPU 9000"):
        got = choose_peak(configured=None, device_name=name, dtype=torch.bfloat16,
                          measured_gemm=0.123)
        assert (got.tflops, got.source, got.label) == (0.123, "measured-gemm", "measured-gemm")
        assert "measured" in source_words(got.code)
    assert [source_words(i) is not None for i in range(-1, len(SOURCES) + 1)] == \
        [False] + [True] * len(SOURCES) + [False]


# --------------------------------------------------------------------------- packed documents

def _doc_ids(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])


def _brute_pairs(doc_t: torch.Tensor) -> int:
    """(query i, key j) with j <= i in the same document, by enumeration."""
    same = doc_t[:, None] == doc_t[None, :]
    causal = torch.ones(len(doc_t), len(doc_t), dtype=torch.bool).tril()
    return int((same & causal).sum())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_packed_document_pairs_match_brute_force_under_any_cp_split(seed):
    from longtrain.data.loader import document_positions
    from longtrain.observability.flops import causal_pairs, document_pairs, pairs_of_positions
    from longtrain.parallel.layout import split_for_cp

    gen = torch.Generator().manual_seed(seed)
    t = 8 * int(torch.randint(8, 40, (1,), generator=gen))
    cuts = sorted(torch.randperm(t - 1, generator=gen)[:int(torch.randint(1, 9, (1,),
                                                                          generator=gen))] + 1)
    bounds = [0, *[int(c) for c in cuts], t]
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    doc = _doc_ids(lengths)
    brute = _brute_pairs(doc)
    assert document_pairs(lengths) == brute
    positions_bt = document_positions(doc[None])
    assert pairs_of_positions(positions_bt) == brute
    # each CP rank's zigzag shard counts its own tokens; the shards add up to the whole
    for cp in (2, 4):
        shards = [split_for_cp(positions_bt, cp_size=cp, cp_rank=r, dim=1) for r in range(cp)]
        assert sum(pairs_of_positions(s) for s in shards) == brute
    assert brute < causal_pairs(t)


def test_step_flops_count_softmax_layers_at_the_documents_pairs():
    from longtrain.config.schema import RunConfig
    from longtrain.model.flops import step_flops
    from longtrain.observability.flops import causal_pairs

    cfg = RunConfig()
    cfg.data.seq_len, cfg.data.batch_size = 512, 2
    whole = step_flops(cfg)
    assert whole.pairs == 2 * causal_pairs(512)
    assert whole.with_pairs(whole.pairs) == whole
    m = cfg.model
    d = m.hidden_size // m.num_heads
    pairs = causal_pairs(100) + causal_pairs(412) + causal_pairs(512)
    packed = whole.with_pairs(pairs)
    # forward 4 D per pair and head on every layer, backward twice the forward
    assert packed.attention == pytest.approx(3 * 4 * d * m.num_heads * m.num_layers * pairs)
    assert packed.matmul == whole.matmul and packed.total < whole.total

    # a hybrid: only its softmax layers count pairs; the linear layers keep their own count
    cfg.model.layer_pattern = "LLLS"
    hybrid = step_flops(cfg)
    assert hybrid.per_pair == pytest.approx(3 * 4 * d * m.num_heads * 1)
    assert hybrid.with_pairs(pairs).attention == pytest.approx(
        hybrid.attention - hybrid.per_pair * (hybrid.pairs - pairs))


# --------------------------------------------------------------------------- the step metrics

def _runtime():
    return SimpleNamespace(device=torch.device("cpu"), rank=0, dims=SimpleNamespace(tp=1),
                           tp_group=None, cp_group=None, ulysses_group=None, ring_group=None,
                           dp_cp_group=None, dp_group=None)


def test_step_metrics_name_their_denominator_and_count_document_pairs(monkeypatch):
    import longtrain.train.metrics as metrics_mod
    from longtrain.config.schema import RunConfig
    from longtrain.model.flops import step_flops

    cfg = RunConfig()
    cfg.data.seq_len, cfg.data.batch_size = 512, 2
    whole = step_flops(cfg)

    # CPU: no datasheet peak, so the measured GEMM, said as such
    obs = metrics_mod.StepMetrics(cfg, _runtime(), dtype=torch.float32)
    obs.start_step()
    got = {"step_time_s": 0.5}
    obs.finish_step(cfg, got)
    assert got["mfu_peak_source"] == SOURCES.index("measured-gemm")
    assert got["peak_tflops"] == got["gemm_tflops"] == obs.gemm_tflops
    assert got["tflops"] == pytest.approx(whole.total / 0.5 / 1e12)
    assert got["mfu"] == pytest.approx(got["mfu_vs_gemm"])
    assert all(isinstance(v, (int, float)) for v in got.values())

    # packed documents: this rank's pairs replace the whole sequences' pairs
    got = {"step_time_s": 0.5}
    obs.finish_step(cfg, got, pairs=1000.0)
    assert got["tflops"] == pytest.approx(whole.with_pairs(1000.0).total / 0.5 / 1e12)

    # logging.peak_tflops wins; the GEMM ratio is still there
    cfg.logging.peak_tflops = 2.0
    obs = metrics_mod.StepMetrics(cfg, _runtime(), dtype=torch.float32)
    got = {"step_time_s": 0.5}
    obs.finish_step(cfg, got)
    assert got["mfu_peak_source"] == SOURCES.index("config") and got["peak_tflops"] == 2.0
    assert got["mfu"] == pytest.approx(got["tflops"] / 2.0)
    assert got["mfu_vs_gemm"] == pytest.approx(got["tflops"] / got["gemm_tflops"])

    # a device the table knows: its dense datasheet peak in the training dtype
    cfg.logging.peak_tflops = None
    monkeypatch.setattr(metrics_mod, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    obs = metrics_mod.StepMetrics(cfg, _runtime(), dtype=torch.bfloat16)
    got = {"step_time_s": 0.5}
    obs.finish_step(cfg, got)
    assert got["mfu_peak_source"] == SOURCES.index("spec") and got["peak_tflops"] == 989.0
    assert obs.peak.label == "spec:H100 SXM bf16"


def test_run_summary_says_which_denominator():
    from longtrain.observability.progress import RunSummary, render_summary

    summary = RunSummary()
    for step in range(1, 6):
        summary.add({"step": step, "loss": 1.0, "tokens_per_s": 10.0, "mfu": 0.4,
                     "comm_exposed_frac": 0.0, "mem_peak_gib_max": 1.0, "peak_tflops": 989.0,
                     "mfu_vs_gemm": 0.6, "gemm_tflops": 660.0, "mfu_peak_source": 0})
    text = render_summary(summary.as_dict())
    assert "40.0% of 989 TFLOP/s per device (the device's dense datasheet peak)" in text
    assert "60.0% of the measured GEMM, 660 TFLOP/s" in text
