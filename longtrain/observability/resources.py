"""Per-process resource readings for the step metrics: peak memory (the CUDA allocator's, or
the kernel's peak RSS on CPU), the device's capacity, and a measured GEMM peak for MFU.

Peak RSS on Linux: writing "5" to /proc/self/clear_refs sets VmHWM (the high-water mark of
the resident set) back to the current RSS, so a per-step peak is VmHWM read at the end of the
step after a reset at its start. Where /proc is not there the peak is `ru_maxrss` since the
process started.
"""

from __future__ import annotations

import os
import re
import resource
import time

import torch


def status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status", encoding="ascii") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS; returns that RSS (KiB)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    return status_kib("VmRSS")


class PeakMemory:
    """This process's peak memory on `device` since the last `reset()`, in bytes: CUDA's max
    allocated, or the resident set's high-water mark on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._proc = True

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if self._proc:
            try:
                reset_peak_rss()
            except OSError:
                self._proc = False

    def read(self) -> float:
        if self.cuda:
            return float(torch.cuda.max_memory_allocated(self.device))
        if self._proc:
            try:
                return status_kib("VmHWM") * 1024.0
            except (OSError, AttributeError):
                self._proc = False
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def device_capacity_bytes(device: torch.device) -> float:
    """The memory the peak is measured against: the CUDA device's total memory, or this host's
    physical RAM on CPU (shared by the ranks on the host)."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def measure_gemm_tflops(device: torch.device, dtype: torch.dtype, *, seconds: float = 0.3
                        ) -> float:
    """Dense matmul throughput of this process on `device` in `dtype` (TFLOP/s): square
    GEMMs (4096 on CUDA, 1024 on CPU) after one warm-up, repeated for about `seconds`; the
    fastest interval between synchronizations (one GEMM on CPU, four on CUDA) counts, so that
    a moment of contention from another process (a busy machine at start) does not lower the
    peak that MFU is read against."""
    n = 4096 if device.type == "cuda" else 1024
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b)
    sync()
    reps, start = 0, time.perf_counter()
    best, mark, since = 0.0, start, 0
    while True:
        torch.mm(a, b)
        reps += 1
        since += 1
        if reps % 4 == 0 or device.type != "cuda":
            sync()
            now = time.perf_counter()
            best = max(best, 2.0 * n ** 3 * since / max(now - mark, 1e-9) / 1e12)
            mark, since = now, 0
            if now - start >= seconds or reps >= 10_000:
                return best
