"""The per-step metrics that need every rank: MFU, peak memory over ranks beside what it is
measured against, exposed communication time by group, compute time over ranks.

Each rank times its own blocking in communication (`longtrain.parallel.commtime`) and reads
its own peak memory (`longtrain.observability.resources`); after the step one all-gather of a
few numbers per rank gives every rank the min / max / mean of the peaks, the max of the
communication times (the slowest rank sets the pace) and the min / max of the compute time
(the step's time less this rank's blocked communication) with the rank that took longest:
a rank whose compute stands out is a load imbalance (e.g. an uneven CP split). The
all-gather itself is not timed.

MFU is the step's model FLOPs (`longtrain.model.flops`; with packed documents the causal
pairs within each document, summed over the ranks' shards) over the devices' peak: the dense
datasheet peak of the device in the training dtype (`observability.peaks`), or
`logging.peak_tflops` when set, or - where the table has no figure (CPU, an unknown GPU) - a
GEMM measured at start. `mfu_peak_source` says which (0 spec, 1 config, 2 measured GEMM; the
startup log line names it in words), and `mfu_vs_gemm` is the same FLOPs over the measured
GEMM in every case.

Beside the peaks, every step carries the device's capacity (`mem_capacity_gib`), the
planner's estimate for the configured memory policy (`mem_estimate_gib`,
`longtrain.memory.estimate`) and `memory.budget_gib` when set (`mem_budget_gib`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from longtrain.memory.estimate import estimate_bytes
from longtrain.model.flops import StepFlops, step_flops
from longtrain.observability.log import get_logger
from longtrain.observability.peaks import MfuPeak, choose_peak, device_name
from longtrain.observability.resources import (PeakMemory, device_capacity_bytes,
                                               measure_gemm_tflops)
from longtrain.parallel.commtime import CommTimer

GROUPS = ("tp", "cp", "dp", "other")
_GIB = float(2 ** 30)


class StepMetrics:
    """Installed for the training loop's life on one rank (`with StepMetrics(...)`)."""

    def __init__(self, cfg: Any, runtime: Any, *, dtype: torch.dtype) -> None:
        self.timer = CommTimer()
        self.memory = PeakMemory(runtime.device)
        # this device's measured GEMM and the MFU denominator, TFLOP/s
        self.gemm_tflops = measure_gemm_tflops(runtime.device, dtype)
        self.peak: MfuPeak = choose_peak(
            configured=cfg.logging.peak_tflops, device_name=device_name(runtime.device),
            dtype=dtype, measured_gemm=self.gemm_tflops,
            fp32_matmul_precision=torch.get_float32_matmul_precision())
        self.peak_tflops = self.peak.tflops
        if runtime.rank == 0:
            get_logger().info("MFU denominator: %.4g TFLOP/s per device (%s); measured GEMM "
                              "%.4g TFLOP/s", self.peak.tflops, self.peak.label, self.gemm_tflops)

        # what the measured peak is read against: constant for the run
        self.memory_refs = {"mem_capacity_gib": device_capacity_bytes(runtime.device) / _GIB,
                            "mem_estimate_gib": estimate_bytes(
                                cfg, on_gpu=runtime.device.type == "cuda") / _GIB}
        if cfg.memory.budget_gib is not None:
            self.memory_refs["mem_budget_gib"] = float(cfg.memory.budget_gib)
        self.set_runtime(runtime)
        self._flops: dict[tuple[int, int], StepFlops] = {}

    def set_runtime(self, runtime: Any) -> None:
        """The mesh (a schedule stage that changes CP builds a new one)."""
        self.runtime = runtime
        # a group that plays two roles (CP x DP is the CP group when dp = 1) takes the first
        self.timer.set_groups([("tp", runtime.tp_group), ("cp", runtime.cp_group),
                               ("cp", runtime.ulysses_group), ("cp", runtime.ring_group),
                               ("dp", runtime.dp_cp_group), ("dp", runtime.dp_group)])

    def __enter__(self) -> "StepMetrics":
        self.timer.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.timer.__exit__(*exc)

    def start_step(self) -> None:
        self.memory.reset()
        self.timer.take()

    def flops(self, cfg: Any, *, pairs: Optional[float] = None) -> float:
        """The step's model FLOPs; `pairs`: the causal same-document pairs of the whole
        global batch (packed documents), None for whole sequences."""
        key = (cfg.data.seq_len, cfg.data.batch_size)
        if key not in self._flops:
            self._flops[key] = step_flops(cfg)
        got = self._flops[key]
        return got.total if pairs is None else got.with_pairs(pairs).total

    def finish_step(self, cfg: Any, metrics: dict[str, Any], *,
                    pairs: Optional[float] = None) -> None:
        """Add the cross-rank metrics to `metrics` (every rank gets the same values).
        `pairs`: this rank's share of the step's causal same-document pairs (the sum of
        position + 1 over its tokens, `observability.flops.pairs_of_positions`), None when
        the batch has no document ids."""
        comm = self.timer.take()
        dt = metrics["step_time_s"]
        mine = [self.memory.read() / _GIB, sum(comm.values()),
                *(comm.get(g, 0.0) for g in GROUPS), max(dt - sum(comm.values()), 0.0),
                float("nan") if pairs is None else float(pairs), self.gemm_tflops,
                self.peak_tflops]
        stats = torch.tensor(mine, dtype=torch.float64)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            self.timer.enabled = False
            try:
                parts = [torch.empty_like(stats) for _ in range(world)]
                dist.all_gather(parts, stats)
            finally:
                self.timer.enabled = True
            all_ranks = torch.stack(parts)
        else:
            all_ranks = stats[None]
        mem, total = all_ranks[:, 0], all_ranks[:, 1]
        metrics["mem_peak_gib_min"] = float(mem.min())
        metrics["mem_peak_gib_max"] = float(mem.max())
        metrics["mem_peak_gib_mean"] = float(mem.mean())
        metrics.update(self.memory_refs)
        metrics["comm_exposed_s"] = float(total.max())
        metrics["comm_exposed_frac"] = float(total.max()) / dt if dt > 0 else 0.0
        for i, g in enumerate(GROUPS):
            metrics[f"comm_{g}_s"] = float(all_ranks[:, 2 + i].max())
        compute = all_ranks[:, 2 + len(GROUPS)]
        metrics["compute_s_min"] = float(compute.min())
        metrics["compute_s_max"] = float(compute.max())
        metrics["compute_slowest_rank"] = int(compute.argmax())
        local_pairs = all_ranks[:, 3 + len(GROUPS)]
        # TP ranks hold the same tokens: count each token once
        global_pairs = (None if bool(torch.isnan(local_pairs).any())
                        else float(local_pairs.sum()) / self.runtime.dims.tp)
        flops = self.flops(cfg, pairs=global_pairs)
        gemm, peak = all_ranks[:, -2], all_ranks[:, -1]
        metrics["tflops"] = flops / dt / world / 1e12 if dt > 0 else 0.0
        metrics["mfu"] = flops / dt / 1e12 / float(peak.sum()) if dt > 0 else 0.0
        metrics["mfu_vs_gemm"] = flops / dt / 1e12 / float(gemm.sum()) if dt > 0 else 0.0
        metrics["peak_tflops"] = float(peak.mean())
        metrics["gemm_tflops"] = float(gemm.mean())
        metrics["mfu_peak_source"] = self.peak.code
