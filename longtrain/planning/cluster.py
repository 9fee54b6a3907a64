"""The clusters the cost model predicts for: a `Cluster` (devices, peak, efficiencies, links),
the presets (`h100-8x8-ib400`, `h100-1x8`, and `cpu-local`: this machine as fitted by
benchmarks/costmodel.py), the `cluster` config group's resolution and problems, and the
least-squares line the fits use."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

from longtrain.parallel.collective_cost import Link


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: int
    devices_per_node: int
    # dense peak of one device in the training dtype
    peak_tflops: float
    # achieved fraction of the peak for GEMMs and for attention kernels (fwd+bwd)
    gemm_eff: float
    attn_eff: float
    intra: Link
    inter: Link
    memory_gib: float
    # fraction of the gradient all-reduce hidden behind the backward
    dp_overlap: float = 0.0
    # achieved fraction of the peak for linear (lightning) attention; None: attn_eff
    linear_eff: Optional[float] = None
    # a device's link to host memory (memory.offload's traffic); None: no offloading
    host: Optional[Link] = None
    # host memory a device's offloaded activations may take (GiB); None: no limit
    host_memory_gib: Optional[float] = None

    @property
    def devices(self) -> int:
        return self.nodes * self.devices_per_node

    def link(self, span: int) -> Link:
        """The link a group of `span` consecutive ranks communicates over."""
        return self.intra if span <= self.devices_per_node else self.inter


# H100 SXM: 989 dense bf16 TFLOP/s; NVLink 4 = 450 GB/s per direction per GPU; one 400 Gb/s
# (50 GB/s) InfiniBand NIC per GPU; achieved fractions typical of large GEMMs (~60%) and of
# flash-attention fwd+bwd (~45%) on H100, lightning attention assumed at 30%; 80 GiB HBM;
# PCIe Gen5 x16 to the host, 64 GB/s nominal, ~50 GB/s reached with pinned memory; 2 TB of
# host memory per node of 8 (DGX H100), of which offloaded activations may take 3/4, the
# rest left to the process, the loader and the pinned staging buffers. These are
# specification bandwidths (NCCL reaches ~80% of them on large messages): communication
# here is a lower bound.
_H100 = dict(peak_tflops=989.0, gemm_eff=0.6, attn_eff=0.45, linear_eff=0.3,
             intra=Link(450.0, 3e-6), inter=Link(50.0, 10e-6), memory_gib=80.0,
             host=Link(50.0, 10e-6), host_memory_gib=0.75 * 2048 / 8)
PRESETS = {
    "h100-8x8-ib400": Cluster("h100-8x8-ib400", nodes=8, devices_per_node=8, **_H100),
    "h100-1x8": Cluster("h100-1x8", nodes=1, devices_per_node=8, **_H100),
}

# This machine (AMD EPYC, 2 cores, 23 GiB RAM) as a cluster of 2 gloo processes x 1 thread,
# every value fitted by `python -m benchmarks.costmodel` (full run, 2026-11-23, its "Fit"
# table): the peak is one thread's fp32 GEMM rate (so gemm_eff = 1), attn_eff / linear_eff
# the measured fwd+bwd rates of causal SDPA / lightning attention over it, the link the
# weighted least-squares fit of a gloo ring hop over loopback (one node: the inter-node link
# is the same), memory half the RAM. Refit with the benchmark on another machine.
CPU_FIT = {"peak_tflops": 0.102, "attn_eff": 0.71, "linear_eff": 0.28, "gbytes_per_s": 2.07,
           "latency_s": 2.7e-4, "memory_gib": 11.5}
_CPU_LINK = Link(CPU_FIT["gbytes_per_s"], CPU_FIT["latency_s"])
PRESETS["cpu-local"] = Cluster("cpu-local", nodes=1, devices_per_node=2,
                               peak_tflops=CPU_FIT["peak_tflops"], gemm_eff=1.0,
                               attn_eff=CPU_FIT["attn_eff"], intra=_CPU_LINK, inter=_CPU_LINK,
                               memory_gib=CPU_FIT["memory_gib"],
                               linear_eff=CPU_FIT["linear_eff"])


def cluster_from_config(cfg: Any) -> Optional[Cluster]:
    """The `cluster` config group as a Cluster (None: preset none); overrides replace the
    preset's fields."""
    cc = cfg.cluster
    if cc.preset == "none":
        return None
    base = PRESETS[cc.preset]
    changes: dict[str, Any] = {}
    for name in ("nodes", "devices_per_node", "peak_tflops", "memory_gib"):
        if getattr(cc, name) is not None:
            changes[name] = getattr(cc, name)
    if cc.inter_node_gbit is not None:
        changes["inter"] = replace(base.inter, gbytes_per_s=cc.inter_node_gbit / 8)
    if cc.intra_node_gbytes is not None:
        changes["intra"] = replace(base.intra, gbytes_per_s=cc.intra_node_gbytes)
    return replace(base, **changes) if changes else base


def fit_line(xs: list[float], ys: list[float], *, weights: Optional[list[float]] = None
             ) -> tuple[float, float]:
    """(intercept, slope) of the (weighted) least-squares line through (xs, ys). Timings over
    sizes spanning decades: weights 1 / y^2 fit relative errors, so the small messages set
    the latency instead of being drowned by the large ones."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        raise ValueError(f"a line needs 2 distinct x values, got {sorted(set(xs))}")
    w = weights or [1.0] * n
    sw = sum(w)
    mx = sum(wi * x for wi, x in zip(w, xs)) / sw
    my = sum(wi * y for wi, y in zip(w, ys)) / sw
    slope = (sum(wi * (x - mx) * (y - my) for wi, x, y in zip(w, xs, ys))
             / sum(wi * (x - mx) ** 2 for wi, x in zip(w, xs)))
    return my - slope * mx, slope


def cluster_problems(cfg: Any) -> list[str]:
    """What is wrong with the `cluster` group, naming fields and values."""
    cc = cfg.cluster
    found = []
    if cc.preset != "none" and cc.preset not in PRESETS:
        return [f"cluster.preset={cc.preset!r} is not a known cluster; choose from "
                f"{['none', *PRESETS]}"]
    for name in ("nodes", "devices_per_node", "peak_tflops", "memory_gib", "inter_node_gbit",
                 "intra_node_gbytes"):
        v = getattr(cc, name)
        if v is not None and not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            found.append(f"cluster.{name}={v!r} must be a positive number")
    if cc.preset == "none":
        set_ = [n for n in ("nodes", "devices_per_node", "peak_tflops", "memory_gib",
                            "inter_node_gbit", "intra_node_gbytes") if getattr(cc, n) is not None]
        if set_:
            found.append(f"cluster.{set_[0]} is set but cluster.preset=none: name a preset "
                         f"({list(PRESETS)}) to override")
    elif not found:
        cl = cluster_from_config(cfg)
        if cl.devices != cfg.parallel.world_size:
            found.append(f"cluster.nodes * cluster.devices_per_node = {cl.nodes} * "
                         f"{cl.devices_per_node} = {cl.devices} != parallel.world_size="
                         f"{cfg.parallel.world_size}")
    return found
