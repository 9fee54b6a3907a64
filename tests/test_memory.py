"""Memory policies: int8 activation storage (Mesa), recomputation, the activation-memory model
and memory=auto.

The int8 bound: storing the saved tensors as int8 (one scale per 64 values) moves each
parameter gradient of the tiny model by at most INT8_GRAD_RTOL of its norm (measured: 1.0e-2
for int8, 1.2e-2 for int8 + full recomputation); the forward is exact, so the loss is
bit-identical. Recomputation alone gives bit-identical gradients here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
import torch

from longtrain.parallel.spawn import run_distributed

INT8_GRAD_RTOL = 0.03
POLICIES = [("none", "none"), ("int8", "none"), ("none", "selective"), ("none", "full"),
            ("int8", "selective"), ("int8", "full")]


def _config(**memory: Any):
    from longtrain.config.schema import RunConfig

    cfg = RunConfig()
    cfg.data.seq_len, cfg.data.docs_per_seq = 384, 2
    cfg.data.batch_size, cfg.data.micro_batch_size = 2, 1
    cfg.checkpoint.resume, cfg.checkpoint.every, cfg.checkpoint.save_final = "never", 0, False
    for k, v in memory.items():
        setattr(cfg.memory, k, v)
    return cfg


def _one_step_grads(rt: Any, out_path: str, precision: str) -> None:
    """Loss, canonical gradients and the store's byte count of one fwd+bwd per policy."""
    from longtrain.data.loader import iterate
    from longtrain.memory.estimate import Policy, Shape, activation_bytes
    from longtrain.model.sharding import canonical_state_dict
    from longtrain.train.loop import attention_context, build_model
    from longtrain.train.loss import token_loss_sum

    results = {}
    for activations, checkpointing in POLICIES:
        cfg = _config(activations=activations, checkpointing=checkpointing)
        # one document per row: dense attention over packed documents also keeps its
        # [T, T] mask, which the model leaves out (the flash kernels take document ids)
        cfg.data.docs_per_seq = 1
        cfg.train.precision = precision
        model = build_model(cfg, rt)
        mb = next(iterate(cfg.data, start_step=0, dp_size=1, dp_rank=0, cp_size=1, cp_rank=0))[0]
        logits = model(mb.tokens_bt, positions_bt=mb.positions_bt, doc_ids_bt=mb.doc_ids_bt,
                       seq_len=cfg.data.seq_len, ctx=attention_context(rt))
        stats = model.memory_policy.store.stats
        token_loss_sum(logits, mb.labels_bt).backward()
        grads = canonical_state_dict(model, grads=True)
        est = activation_bytes(Shape.of(cfg), Policy(activations, checkpointing))
        results[(activations, checkpointing)] = {
            "logits": logits.detach().float(), "grads": {k: v.float() for k, v in grads.items()},
            "measured": stats.device_bytes, "raw": stats.raw_bytes,
            "modelled": est["layers"] + est["final"]}
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def one_step(tmp_path_factory) -> dict:
    path = str(tmp_path_factory.mktemp("mem") / "fp32.pt")
    run_distributed(_one_step_grads, world_size=1, args=(path, "fp32"))
    return torch.load(path, weights_only=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_int8_storage_keeps_the_forward_exact_and_gradients_within_bound(one_step) -> None:
    none, int8 = one_step[("none", "none")], one_step[("int8", "none")]
    assert torch.equal(int8["logits"], none["logits"])
    errors = {k: _rel(int8["grads"][k], g) for k, g in none["grads"].items()}
    assert max(errors.values()) <= INT8_GRAD_RTOL, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    # int8 did change what the backward saw (a no-op store would pass the bound trivially)
    assert max(errors.values()) > 0
    assert int8["measured"] < 0.35 * none["measured"], (int8["measured"], none["measured"])


@pytest.mark.parametrize("checkpointing", ["selective", "full"])
def test_recomputation_gives_the_same_gradients_in_fp32(one_step, checkpointing) -> None:
    none, ck = one_step[("none", "none")], one_step[("none", checkpointing)]
    assert torch.equal(ck["logits"], none["logits"])
    for k, g in none["grads"].items():
        assert torch.allclose(ck["grads"][k], g, rtol=1e-6, atol=1e-9), (k, _rel(ck["grads"][k], g))
    assert ck["measured"] < none["measured"]


@pytest.mark.parametrize("policy", POLICIES, ids=["+".join(p) for p in POLICIES])
def test_activation_model_matches_the_measured_saved_bytes(one_step, policy) -> None:
    r = one_step[policy]
    assert abs(r["measured"] - r["modelled"]) <= 0.05 * r["measured"], r["measured"]


def test_int8_and_recomputation_combine(one_step) -> None:
    none = one_step[("none", "none")]
    for policy in (("int8", "selective"), ("int8", "full")):
        r = one_step[policy]
        assert torch.equal(r["logits"], none["logits"])
        errors = [_rel(r["grads"][k], g) for k, g in none["grads"].items()]
        assert max(errors) <= INT8_GRAD_RTOL, (policy, max(errors))
    sizes = [one_step[p]["measured"] for p in [("none", "none"), ("int8", "none"),
                                               ("int8", "selective"), ("int8", "full")]]
    assert sizes == sorted(sizes, reverse=True), sizes


# --------------------------------------------------------------------------- under TP and CP

def _curves(rt: Any, backend: str, pattern: str, out_path: str) -> None:
    from longtrain.train.loop import TrainState, train

    out = {}
    for policy in (("none", "none"), ("int8", "selective"), ("int8", "full")):
        cfg = _config(activations=policy[0], checkpointing=policy[1])
        cfg.parallel.world_size, cfg.parallel.tp, cfg.parallel.cp = (
            rt.dims.world_size, rt.dims.tp, rt.dims.cp)
        cfg.attention.backend, cfg.model.layer_pattern = backend, pattern
        if backend == "s2":
            cfg.attention.s2.block_size, cfg.attention.s2.vert_stride = 16, 4
            cfg.attention.s2.dense_first = cfg.attention.s2.dense_every = 0
        cfg.train.steps, cfg.optim.warmup_steps, cfg.optim.lr = 3, 1, 1e-3
        state = TrainState.create(cfg, rt)
        out[policy] = [(m["loss"], m["grad_norm"]) for m in train(cfg, rt, state=state)]
    if rt.rank == 0:
        torch.save(out, out_path)


@pytest.mark.parametrize("backend,pattern,world,tp,cp", [
    ("ring", "", 4, 2, 2), ("ulysses", "", 2, 1, 2), ("lasp2", "3:1", 2, 1, 2),
    ("s2", "", 2, 1, 2)], ids=["ring-tp2xcp2", "ulysses-cp2", "lasp2-hybrid-cp2", "s2-cp2"])
def test_int8_and_recomputation_under_tp_and_every_cp_backend(tmp_path, backend, pattern, world,
                                                              tp, cp) -> None:
    path = os.path.join(tmp_path, "c.pt")
    run_distributed(_curves, world_size=world, tp=tp, cp=cp, args=(backend, pattern, path))
    curves = torch.load(path, weights_only=False)
    base = curves[("none", "none")]
    for policy, curve in curves.items():
        # step 1's loss comes from the same weights: the forward is exact under every policy
        assert curve[0][0] == base[0][0], (policy, curve[0], base[0])
        for (loss, norm), (loss0, norm0) in zip(curve, base):
            assert abs(loss - loss0) <= 1e-3 * abs(loss0), (policy, curve, base)
            assert abs(norm - norm0) <= INT8_GRAD_RTOL * norm0, (policy, curve, base)


@pytest.mark.slow
def test_int8_training_ends_within_six_percent_of_the_baseline(tmp_path) -> None:
    path = os.path.join(tmp_path, "long.pt")
    run_distributed(_long_curves, world_size=1, args=(path,))
    curves = torch.load(path, weights_only=False)
    # the mean of the last 10 steps (same batches in both runs). The int8 gradient error
    # (INT8_GRAD_RTOL) sends the run down a nearby trajectory: measured 2026-12-07 on this
    # setup, the two tails end 2.5% to 4.6% apart at lr 5e-4 .. 1e-3, either sign, with the
    # head input stored in int8 (before the chunked loss) or not (after); 0.015% at lr 1e-3
    # before was the lucky case the former 1% bound relied on.
    tail = {k: sum(v[-10:]) / 10 for k, v in curves.items()}
    assert curves["none"][-1] < 0.5 * curves["none"][0], "the baseline must actually train"
    assert curves["int8"][-1] < 0.5 * curves["int8"][0], "int8 must train as well"
    assert abs(tail["int8"] - tail["none"]) <= 0.06 * tail["none"], tail


def _long_curves(rt: Any, out_path: str) -> None:
    from longtrain.train.loop import TrainState, train

    out = {}
    for activations in ("none", "int8"):
        cfg = _config(activations=activations)
        cfg.data.docs_per_seq = 1
        # lr 1e-3: at the default 3e-3 this model's curve is chaotic (two fp32 runs that differ
        # only in summation order part by 7e-4 within 20 steps, test_lasp), which would swamp
        # what int8 changes
        cfg.train.steps, cfg.optim.lr = 200, 1e-3
        state = TrainState.create(cfg, rt)
        out[activations] = [m["loss"] for m in train(cfg, rt, state=state)]
    torch.save(out, out_path)


# --------------------------------------------------------------------------- the store itself

def test_store_keeps_parameters_shared_tensors_and_statistics_exact() -> None:
    from longtrain.memory import ActivationStore

    w = torch.nn.Parameter(torch.randn(64, 64))
    shared = torch.randn(1, 128, 64)
    store = ActivationStore(int8=True, params=[w])
    x = torch.randn(1, 128, 64, requires_grad=True)
    with store.forward() as stats:
        store.share(shared)
        y = (x @ w) * shared.unsqueeze(2).squeeze(2)  # w saved by reference; shared as is
        y = y * shared  # the shared storage is counted once
        with store.attention(64):
            lse = torch.logsumexp(y, dim=1)  # [1, 64]: last dim is the "head dim" here
            z = torch.exp(y - lse[:, None])  # saves its output [1, 128, 64]: quantized
            stat = y.pow(2).mean(-1, keepdim=True)  # [1, 128, 1]: kept
    (z.sum() + stat.sum()).backward()
    assert stats.raw_bytes > 0 and stats.quantized_tensors >= 2
    # nothing of w or `shared` was packed: the only kept tensors are small statistics and
    # the shared one
    assert stats.device_bytes < stats.raw_bytes
    ref = torch.randn(1, 128, 64)
    from longtrain_kernels.int8_quant import dequantize, quantize

    q, scale = quantize(ref, 64)
    back = dequantize(q, scale, shape=ref.shape, dtype=ref.dtype, group_size=64)
    bound = ref.view(-1, 64).abs().amax(-1, keepdim=True) / 254
    assert bool(((back - ref).view(-1, 64).abs() <= bound * (1 + 1e-6)).all())


def test_store_outside_a_forward_is_inert() -> None:
    from longtrain.memory import ActivationStore

    store = ActivationStore(int8=True)
    x = torch.randn(4, 256, requires_grad=True)
    with store.attention(256):  # not inside store.forward(): no hooks
        y = torch.exp(x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.exp(x.detach()))
    assert store.stats.raw_bytes == 0


# --------------------------------------------------------------------------- memory=auto

def test_memory_auto_picks_the_fastest_policy_that_fits() -> None:
    from longtrain.memory.estimate import GIB, estimates
    from longtrain.planning.memory import choose

    cfg = _config(auto=True)
    cfg.data.seq_len = 8192
    table = {e.policy.name: e for e in estimates(cfg, on_gpu=False)}
    assert set(table) == {"none", "int8", "selective", "int8+selective", "full", "int8+full"}
    acts = [table[n].activations for n in ("none", "selective", "int8", "int8+full")]
    assert acts == sorted(acts, reverse=True), acts
    big = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, budget_gib=1000.0))
    chosen, report = choose(big, on_gpu=False)
    assert chosen.memory.activations == "none" and chosen.memory.checkpointing == "none"
    assert "chosen: none" in report
    # a budget just above int8+full's need: it (or anything cheaper that fits) is chosen
    need = table["int8+full"].total
    tight = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory,
                                                                budget_gib=need * 1.01 / GIB))
    chosen, report = choose(tight, on_gpu=False)
    picked = f"{chosen.memory.activations}+{chosen.memory.checkpointing}"
    fitting = [e for e in table.values() if e.total <= need * 1.01]
    assert min(fitting, key=lambda e: e.cost).policy == next(
        e.policy for e in table.values()
        if (e.policy.activations, e.policy.checkpointing) == tuple(picked.split("+"))), report
    assert not chosen.memory.auto
    small = dataclasses.replace(cfg, memory=dataclasses.replace(
        cfg.memory, budget_gib=table["int8+full"].total * 0.5 / GIB))
    with pytest.raises(ValueError, match=r"data\.seq_len=8192.*parallel\.cp"):
        choose(small, on_gpu=False)


@pytest.mark.parametrize("change,expected", [
    ({"activations": "int4"}, "memory.activations='int4'"),
    ({"checkpointing": "some"}, "memory.checkpointing='some'"),
    ({"group_size": 24}, "memory.group_size=24"),
    ({"budget_gib": -1.0}, "memory.budget_gib=-1.0 must be > 0"),
])
def test_bad_memory_settings_name_the_fields(change, expected) -> None:
    from longtrain.planning.validate import problems

    cfg = _config(**change)
    assert any(expected in p for p in problems(cfg)), problems(cfg)


def test_preflight_warns_when_the_policy_cannot_fit() -> None:
    from longtrain.memory.estimate import GIB, estimates
    from longtrain.planning.memory import over_budget_warning

    cfg = _config()
    cfg.data.seq_len = 8192
    table = {e.policy.name: e for e in estimates(cfg, on_gpu=False)}
    cfg.memory.budget_gib = (table["none"].total + table["int8"].total) / 2 / GIB
    warning = over_budget_warning(cfg, on_gpu=False)
    assert warning is not None and "memory none" in warning and "would pick int8" in warning
    cfg.memory.activations = "int8"
    assert over_budget_warning(cfg, on_gpu=False) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offload moves CUDA tensors to host")
@pytest.mark.parametrize("int8", [False, True])
def test_offload_keeps_saved_tensors_on_the_host_with_the_same_gradients(int8) -> None:
    from longtrain.memory import ActivationStore

    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.nn.Parameter(torch.randn(256, 256, device="cuda", generator=gen))
    x0 = torch.randn(8, 512, 256, device="cuda", generator=gen)
    grads = []
    for offload in (False, True):
        store = ActivationStore(int8=int8, offload=offload, params=[w])
        x = x0.clone().requires_grad_()
        with store.forward() as stats:
            y = torch.nn.functional.silu(x @ w) * x
        w.grad = None
        y.square().sum().backward()
        grads.append((x.grad.clone(), w.grad.clone()))
        if offload:
            assert stats.host_bytes > 0 and stats.device_bytes < stats.host_bytes, stats
    for a, b in zip(*grads):
        assert torch.equal(a, b)
