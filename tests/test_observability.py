"""Step metrics: causal-correct FLOPs per attention family, exposed communication time, peak
memory over ranks, and what reaches the W&B run files (metrics, config, alerts, no secrets)."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time

import pytest
import torch

from longtrain.parallel.spawn import run_distributed


# --------------------------------------------------------------------------- FLOPs

@pytest.mark.parametrize("t,bs,local,stride,heads,dense_heads,homo", [
    (1024, 64, 4, 8, 8, 0, False), (1000, 16, 2, 4, 4, 1, False), (512, 32, 1, 3, 6, 0, False),
    (96, 16, 4, 2, 2, 0, True), (2048, 64, 4, 8, 16, 2, False)])
def test_s2_pairs_count_exactly_the_pairs_the_pattern_allows(t, bs, local, stride, heads,
                                                             dense_heads, homo):
    from longtrain.observability.flops import s2_pairs
    from longtrain_kernels.s2_attn import S2Pattern

    pattern = S2Pattern(num_heads=heads, block_size=bs, local_blocks=local, vert_stride=stride,
                        homo_head=homo, num_dense_heads=dense_heads)
    n = -(-t // bs)
    blocks = pattern.block_mask(n, n, range(heads))              # [H, n, n]
    token_block = torch.arange(t) // bs
    allowed = blocks[:, token_block][:, :, token_block]          # [H, t, t]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    assert s2_pairs(pattern, t) == int((allowed & causal).sum())


@pytest.mark.parametrize("t", [1, 63, 64, 65, 300])
def test_causal_and_lightning_pair_counts(t):
    from longtrain.observability.flops import causal_pairs, linear_pairs

    i, j = torch.meshgrid(torch.arange(t), torch.arange(t), indexing="ij")
    assert causal_pairs(t) == int((j <= i).sum())
    assert linear_pairs(t, 64) == int(((j <= i) & (i // 64 == j // 64)).sum())


def _matmul_weights(model) -> int:
    from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                               VocabParallelEmbedding)

    total = 0
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            total += module.weight.numel()
    # the LM head: a tied head reads the embedding's weight
    embed = [m for m in model.modules() if isinstance(m, VocabParallelEmbedding)]
    head = [m for m in model.modules() if isinstance(m, ColumnParallelLinear)
            and m.weight.shape[0] == model.cfg.vocab_size]
    if not head:
        total += embed[0].weight.numel()
    return total


def _flops_worker(runtime, out_path: str) -> None:
    from longtrain.config.schema import RunConfig
    from longtrain.model.flops import step_flops
    from longtrain.observability.flops import layer_attention_forward
    from longtrain.train.loop import build_model

    rows = []
    for backend, pattern in (("dense", ""), ("lasp2", "LS"), ("s2", "")):
        cfg = RunConfig()
        cfg.parallel.world_size = 1
        cfg.attention.backend = backend
        cfg.model.layer_pattern = pattern
        cfg.data.seq_len, cfg.data.batch_size = 512, 3
        model = build_model(cfg, runtime)
        flops = step_flops(cfg)
        d = cfg.model.hidden_size // cfg.model.num_heads
        rows.append({"backend": backend, "weights": _matmul_weights(model),
                     "matmul": flops.matmul, "attention": flops.attention,
                     "softmax_layer": layer_attention_forward(
                         "softmax", t=512, heads=cfg.model.num_heads, head_dim=d)})
    with open(out_path, "w") as f:
        json.dump(rows, f)


def test_step_flops_count_every_matmul_weight_and_attention_by_family(tmp_path):
    """The projections' FLOPs are 2 x (the model's matmul weights) per token, x3 for fwd+bwd:
    counted from the built model, not from the formula. Attention: s2 < dense, and a hybrid
    LS model's attention lies between all-linear and all-softmax."""
    path = str(tmp_path / "rows.json")
    run_distributed(_flops_worker, world_size=1, args=(path,))
    rows = {r["backend"]: r for r in json.load(open(path))}
    tokens = 512 * 3
    for r in rows.values():
        assert r["matmul"] == pytest.approx(3 * 2 * r["weights"] * tokens, rel=1e-12), r
    layers = 4
    dense = rows["dense"]["attention"]
    assert dense == pytest.approx(3 * 3 * layers * rows["dense"]["softmax_layer"], rel=1e-12)
    # the s2 preset keeps layers 0, 1 and 3 dense: one sparse layer, cheaper than dense
    assert rows["dense"]["attention"] * 3 / 4 < rows["s2"]["attention"] < dense
    # LS: two linear layers, each far below a softmax layer at 512 tokens
    assert dense / 2 < rows["lasp2"]["attention"] < dense * 0.75


# --------------------------------------------------------------------------- exposed comm time

SLEEP_S = 0.3


def _timer_worker(runtime, out_path: str) -> None:
    import torch.distributed as dist

    from longtrain.parallel.commtime import CommTimer

    rank = dist.get_rank()
    cp = runtime.cp_group
    original = dist.all_reduce
    timer = CommTimer()
    timer.set_groups([("tp", runtime.tp_group), ("cp", cp)])
    got = {}
    with timer:
        # a blocking collective: rank 0 waits while rank 1 sleeps
        if rank == 1:
            time.sleep(SLEEP_S)
        dist.all_reduce(torch.ones(4), group=cp)
        got["blocking"] = timer.take()
        # point to point, asynchronous: only the wait() counts
        buf = torch.zeros(4)
        if rank == 0:
            work = dist.irecv(buf, src=1, group=cp)
            time.sleep(SLEEP_S)          # compute that overlaps: not exposed
            before = timer.take()
            work.wait()
            got["irecv_before_wait"] = before
            got["irecv"] = timer.take()
        else:
            time.sleep(2 * SLEEP_S)
            dist.isend(torch.ones(4), dst=0, group=cp).wait()
            got["irecv"] = timer.take()
        # batch_isend_irecv with P2POps built from the wrapped isend / irecv
        peer = 1 - rank
        if rank == 1:
            time.sleep(SLEEP_S)
        ops = [dist.P2POp(dist.isend, torch.full((4,), float(rank)), peer, group=cp),
               dist.P2POp(dist.irecv, buf, peer, group=cp)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        got["batch"] = timer.take()
        got["batch_value"] = buf.tolist()
        # a forced label, and a group it does not know
        with timer.forced("dp"):
            dist.all_reduce(torch.ones(1), group=cp)
        dist.barrier()
        got["forced"] = timer.take()
    got["restored"] = dist.all_reduce is original
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(got, f)


def test_comm_timer_counts_blocked_time_per_group(tmp_path):
    path = str(tmp_path / "t")
    run_distributed(_timer_worker, world_size=2, cp=2, args=(path,))
    r0, r1 = (json.load(open(f"{path}.{r}")) for r in (0, 1))
    assert r0["blocking"]["cp"] >= SLEEP_S * 0.8 and r1["blocking"].get("cp", 0) < SLEEP_S / 2
    assert set(r0["blocking"]) == {"cp"}
    # rank 0 posted the receive, computed SLEEP_S, then waited about SLEEP_S more
    assert r0["irecv_before_wait"].get("cp", 0.0) < 0.05
    assert SLEEP_S * 0.6 <= r0["irecv"]["cp"] <= 2 * SLEEP_S
    assert r0["batch"]["cp"] >= SLEEP_S * 0.8 and r0["batch_value"] == [1.0] * 4
    assert r1["batch_value"] == [0.0] * 4
    assert set(r0["forced"]) == {"dp", "other"} and r0["forced"]["dp"] >= 0
    assert r0["restored"] and r1["restored"]


# --------------------------------------------------------------------------- the step metrics

def _train_worker(runtime, out_path: str) -> None:
    from longtrain.config.schema import RunConfig
    from longtrain.planning.validate import validate
    from longtrain.model.flops import step_flops
    from longtrain.train.loop import train

    cfg = RunConfig()
    cfg.parallel.world_size, cfg.parallel.cp = 2, 2
    cfg.attention.backend = "ring"
    cfg.data.seq_len, cfg.data.batch_size, cfg.data.micro_batch_size = 512, 2, 1
    cfg.train.steps = 3
    cfg.logging.peak_tflops = 0.5
    cfg.checkpoint.resume, cfg.checkpoint.every, cfg.checkpoint.save_final = "never", 0, False
    validate(cfg)
    metrics = [{k: float(v) for k, v in m.items()} for m in train(cfg, runtime)]
    # packed documents: attention counted at the pairs within each document
    cfg.data.docs_per_seq = 2
    validate(cfg)
    packed = [{k: float(v) for k, v in m.items()} for m in train(cfg, runtime)]
    if runtime.rank == 0:
        from longtrain.attention.segments import runs
        from longtrain.data.loader import global_batch
        from longtrain.observability.flops import document_pairs

        packed_flops = []
        for step in range(cfg.train.steps):
            _, doc_bt1 = global_batch(cfg.data, [2 * step, 2 * step + 1])
            pairs = sum(document_pairs(n for _, _, n in runs(row[:-1])) for row in doc_bt1)
            packed_flops.append(step_flops(cfg).with_pairs(pairs).total)
        with open(out_path, "w") as f:
            json.dump({"metrics": metrics, "flops": step_flops(cfg).total, "packed": packed,
                       "packed_flops": packed_flops}, f)


def test_training_reports_mfu_memory_over_ranks_and_exposed_comm(tmp_path):
    path = str(tmp_path / "m.json")
    run_distributed(_train_worker, world_size=2, cp=2, args=(path,))
    got = json.load(open(path))
    for m in got["metrics"]:
        assert 0 < m["mem_peak_gib_min"] <= m["mem_peak_gib_mean"] <= m["mem_peak_gib_max"]
        # ring attention's K/V exchange and the gradient all-reduce block for some time
        assert m["comm_cp_s"] > 0 and m["comm_dp_s"] > 0
        parts = sum(m[f"comm_{g}_s"] for g in ("tp", "cp", "dp", "other"))
        assert m["comm_exposed_s"] <= parts + 1e-9
        assert m["comm_exposed_frac"] == pytest.approx(m["comm_exposed_s"] / m["step_time_s"])
        assert m["comm_exposed_s"] < m["step_time_s"]
        # achieved FLOP/s per device from the step's FLOPs, against the configured peak
        assert m["tflops"] == pytest.approx(got["flops"] / m["step_time_s"] / 2 / 1e12)
        assert m["peak_tflops"] == 0.5
        assert m["mfu"] == pytest.approx(m["tflops"] / 0.5)
        # the denominator is the configured one; the GEMM ratio beside it
        assert m["mfu_peak_source"] == 1
        assert m["mfu_vs_gemm"] == pytest.approx(m["tflops"] / m["gemm_tflops"])
    for m, flops in zip(got["packed"], got["packed_flops"]):
        assert flops < got["flops"]
        assert m["tflops"] == pytest.approx(flops / m["step_time_s"] / 2 / 1e12)


def test_the_gemm_peak_ignores_a_moment_of_contention(monkeypatch):
    """Two GEMMs stalled for 0.2 s each (another process holding the cores) inside a 0.6 s
    measurement: the peak is the fastest GEMM's, near the undisturbed figure (averaged over
    the window, it would fall to about a third)."""
    import time

    from longtrain.observability.resources import measure_gemm_tflops

    cpu = torch.device("cpu")
    quiet = measure_gemm_tflops(cpu, torch.float32, seconds=0.2)
    real, calls = torch.mm, [0]

    def stalled(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] in (3, 4):  # the first is the warm-up
            time.sleep(0.2)
        return real(a, b)

    monkeypatch.setattr(torch, "mm", stalled)
    busy = measure_gemm_tflops(cpu, torch.float32, seconds=0.6)
    assert calls[0] > 5
    assert busy > 0.6 * quiet, (busy, quiet)


def test_measured_gemm_peak_and_cpu_peak_memory():
    from longtrain.observability.resources import PeakMemory, measure_gemm_tflops

    peak = measure_gemm_tflops(torch.device("cpu"), torch.float32, seconds=0.05)
    assert 1e-3 < peak < 100
    mem = PeakMemory(torch.device("cpu"))
    mem.reset()
    base = mem.read()
    x = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
    x += 1
    del x
    assert mem.read() - base >= 60 * 2 ** 20
    mem.reset()
    assert mem.read() - base < 32 * 2 ** 20


# --------------------------------------------------------------------------- W&B files

SECRET = "lt-test-secret-0123456789abcdef"


def test_wandb_offline_files_hold_metrics_config_alerts_and_no_secret(tmp_path, monkeypatch):
    """The driver's reporter on a real offline W&B run: the redacted config, every step's
    metrics, one alert for the first non-finite loss, the summary; the secret (in the config
    under a credential-like key and in WANDB_API_KEY) appears in no file of the run."""
    from longtrain_launch.driver import Reporter
    from longtrain.config.schema import RunConfig
    from longtrain.observability.progress import Progress
    from longtrain.observability.wandb_files import read_offline_run
    from longtrain.observability.wandb_run import REDACTED, WandbRun

    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    cfg = RunConfig()
    cfg.logging.wandb.name, cfg.logging.wandb.group = "obs-test", "obs-group"
    cfg.logging.wandb.tags = ["ci", "cp2"]
    config = dataclasses.asdict(cfg)
    config["data"]["hf_token"] = SECRET
    run = WandbRun(cfg.logging.wandb, config=config, output_dir=str(tmp_path))
    reporter = Reporter(run, Progress(total=4, enabled=False))
    base = {"lr": 1e-3, "grad_norm": 1.0, "tokens": 1024, "tokens_per_s": 5000.0,
            "step_time_s": 0.2, "data_wait_s": 0.001, "seq_len": 512, "mem_peak_gib_min": 1.0,
            "mem_peak_gib_max": 1.5, "mem_peak_gib_mean": 1.25, "comm_exposed_s": 0.05,
            "comm_exposed_frac": 0.25, "comm_tp_s": 0.0, "comm_cp_s": 0.04, "comm_dp_s": 0.01,
            "comm_other_s": 0.0, "tflops": 0.02, "mfu": 0.2, "peak_tflops": 0.1}
    for step, loss in enumerate([5.0, float("nan"), float("inf"), 4.0], start=1):
        reporter(dict(base, step=step, loss=loss))
    run.finish(reporter.summary.as_dict())

    got = read_offline_run(str(tmp_path))
    assert got.history and len(got.series("train/loss")) == 4
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tflops", "seq_len",
                "mem_peak_gib_min", "mem_peak_gib_max", "mem_peak_gib_mean", "comm_exposed_s",
                "comm_cp_s", "data_wait_s"):
        assert len(got.series(f"train/{key}")) == 4, key
    assert got.series("train/mfu") == [0.2] * 4
    # the resolved config, redacted
    assert got.config["data"]["hf_token"] == REDACTED
    assert got.config["attention"]["backend"] == "dense"
    # one alert, for the first non-finite step
    assert [a[0] for a in got.alerts] == ["non-finite loss"] and "step 2" in got.alerts[0][1]
    assert got.summary["nonfinite_steps"] == 2 and got.summary["mfu"] == pytest.approx(0.2)
    # name / group / tags and the run id kept for resumes
    run_id = open(tmp_path / "wandb_run_id").read().strip()
    assert got.run_id == run_id
    assert (got.name, got.group, got.tags) == ("obs-test", "obs-group", ["ci", "cp2"])
    for path in glob.glob(str(tmp_path / "**" / "*"), recursive=True):
        if os.path.isfile(path):
            assert SECRET.encode() not in open(path, "rb").read(), path


# --------------------------------------------------------------------------- memory and balance

SLOW_RANK, SLOW_S = 1, 0.25


def _imbalance_worker(runtime, out_path: str) -> None:
    """Rank SLOW_RANK sleeps before each forward (a slow rank, injected through its model);
    every rank reports what the loop measured."""
    from longtrain.config.schema import RunConfig
    from longtrain.planning.validate import validate
    from longtrain.train.loop import TrainState, train

    cfg = RunConfig()
    cfg.parallel.world_size, cfg.parallel.cp = 2, 2
    cfg.attention.backend = "ring"
    cfg.data.seq_len, cfg.data.batch_size, cfg.data.micro_batch_size = 512, 2, 1
    cfg.train.steps = 3
    cfg.logging.peak_tflops = 0.5
    cfg.memory.budget_gib = 3.5
    cfg.checkpoint.resume, cfg.checkpoint.every, cfg.checkpoint.save_final = "never", 0, False
    validate(cfg)
    state = TrainState.create(cfg, runtime)
    if runtime.rank == SLOW_RANK:
        state.model.register_forward_pre_hook(lambda *_: time.sleep(SLOW_S))
    metrics = [{k: float(v) for k, v in m.items()} for m in train(cfg, runtime, state=state)]
    with open(f"{out_path}.{runtime.rank}", "w") as f:
        json.dump(metrics, f)


def test_memory_references_and_compute_balance_over_ranks(tmp_path):
    """Beside the measured peaks: the device's capacity, the budget and the planner's estimate;
    compute time min / max over ranks and the slowest rank, found when one rank is slowed."""
    from longtrain.memory.estimate import GIB, estimate_bytes
    from longtrain.config.schema import RunConfig

    path = str(tmp_path / "m.json")
    run_distributed(_imbalance_worker, world_size=2, cp=2, args=(path,))
    per_rank = [json.load(open(f"{path}.{r}")) for r in (0, 1)]
    # identical on every rank
    for a, b in zip(*per_rank):
        for key in ("mem_capacity_gib", "mem_budget_gib", "mem_estimate_gib", "compute_s_min",
                    "compute_s_max", "compute_slowest_rank", "mem_peak_gib_max"):
            assert a[key] == b[key], key
    cfg = RunConfig()
    cfg.parallel.world_size, cfg.parallel.cp = 2, 2
    cfg.attention.backend = "ring"
    cfg.data.seq_len, cfg.data.batch_size, cfg.data.micro_batch_size = 512, 2, 1
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    for m in per_rank[0]:
        assert m["mem_capacity_gib"] == pytest.approx(ram_gib)
        assert m["mem_budget_gib"] == 3.5
        assert m["mem_estimate_gib"] == pytest.approx(estimate_bytes(cfg, on_gpu=False) / GIB)
        assert 0 < m["mem_estimate_gib"] < m["mem_capacity_gib"]
        assert m["mem_peak_gib_max"] < m["mem_capacity_gib"]
        # the slow rank computes for SLOW_S more per micro-batch; the other waits for it in
        # collectives, which is communication time, not compute
        assert m["compute_slowest_rank"] == SLOW_RANK
        assert m["compute_s_max"] >= SLOW_S
        assert m["compute_s_max"] - m["compute_s_min"] >= 0.8 * SLOW_S
        assert 0 <= m["compute_s_min"] <= m["compute_s_max"] <= m["step_time_s"] + 1e-6
