"""The dense peak of a device in a dtype, from the vendors' datasheets: the denominator of MFU
as Megatron, torchtitan and the papers report it.

Every figure is TFLOP/s per device, **dense** (no 2:4 structured sparsity: NVIDIA's datasheets
print the sparse figure with an asterisk, twice the dense one; the table holds half of it).
`bf16` is the tensor-core figure for bf16/fp16 inputs with fp32 accumulation; `tf32` the
tensor-core figure for fp32 matmuls that PyTorch lets run in TF32
(`torch.get_float32_matmul_precision() != "highest"`); `fp32` the non-tensor fp32 figure
(fp32 matmuls at PyTorch's default precision). A device without a figure for a dtype (V100
has no bf16) has None there.

Sources (the datasheets' tables, read 2026-12):
- NVIDIA H100 Tensor Core GPU datasheet (SXM5, PCIe and NVL columns); H200 and H200 NVL
  datasheet; GH200 Grace Hopper superchip datasheet (the GPU is an H100/H200 SXM's).
- NVIDIA A100 Tensor Core GPU datasheet (SXM4 and PCIe share the figures).
- NVIDIA DGX / HGX B200 and GB200 NVL72 specifications (per GPU: the system's figure over
  its GPU count).
- NVIDIA L40S, L40, L4 and A10 datasheets; the A10G (AWS G5) figures as AWS and NVIDIA
  partners publish them (its tensor throughput is about half the A10's).
- NVIDIA V100 datasheet (SXM2 column).
- AMD Instinct MI300X and MI250X data sheets (matrix-core figures).

A device is matched by the words of `torch.cuda.get_device_name()` (e.g. "NVIDIA H100 80GB
HBM3" -> H100 SXM, "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB"): the first row whose words
all appear in the name, so a more specific row (H100 with PCIe) comes before its family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class DevicePeak:
    """One row of the table: the words that identify the device, its label, and its dense
    peaks (TFLOP/s) per dtype key (bf16 | tf32 | fp32)."""

    words: tuple[str, ...]
    label: str
    bf16: Optional[float]
    tf32: Optional[float]
    fp32: Optional[float]


# more specific rows first: the first whose words all appear in the device name wins
TABLE: tuple[DevicePeak, ...] = (
    DevicePeak(("H100", "PCIE"), "H100 PCIe", bf16=756.0, tf32=378.0, fp32=51.0),
    DevicePeak(("H100", "NVL"), "H100 NVL", bf16=835.0, tf32=417.5, fp32=60.0),
    DevicePeak(("H100",), "H100 SXM", bf16=989.0, tf32=494.5, fp32=67.0),
    DevicePeak(("H800", "PCIE"), "H800 PCIe", bf16=756.0, tf32=378.0, fp32=51.0),
    DevicePeak(("H800",), "H800 SXM", bf16=989.0, tf32=494.5, fp32=67.0),
    DevicePeak(("GH200",), "GH200", bf16=989.0, tf32=494.5, fp32=67.0),
    DevicePeak(("H200", "NVL"), "H200 NVL", bf16=835.0, tf32=417.5, fp32=60.0),
    DevicePeak(("H200",), "H200 SXM", bf16=989.0, tf32=494.5, fp32=67.0),
    DevicePeak(("A100",), "A100", bf16=312.0, tf32=156.0, fp32=19.5),
    DevicePeak(("A800",), "A800", bf16=312.0, tf32=156.0, fp32=19.5),
    DevicePeak(("GB200",), "GB200", bf16=2500.0, tf32=1250.0, fp32=80.0),
    DevicePeak(("B200",), "B200", bf16=2250.0, tf32=1125.0, fp32=75.0),
    DevicePeak(("L40S",), "L40S", bf16=362.0, tf32=183.0, fp32=91.6),
    DevicePeak(("L40",), "L40", bf16=181.0, tf32=90.5, fp32=90.5),
    DevicePeak(("L4",), "L4", bf16=121.0, tf32=60.0, fp32=30.3),
    DevicePeak(("A10G",), "A10G", bf16=70.0, tf32=35.0, fp32=31.5),
    DevicePeak(("A10",), "A10", bf16=125.0, tf32=62.5, fp32=31.2),
    DevicePeak(("V100",), "V100", bf16=None, tf32=None, fp32=15.7),
    DevicePeak(("MI300X",), "MI300X", bf16=1307.4, tf32=653.7, fp32=163.4),
    DevicePeak(("MI250X",), "MI250X", bf16=383.0, tf32=None, fp32=95.7),
)

# where the MFU denominator came from: numeric codes so every per-step metric stays a number
# (logged as `mfu_peak_source`; the words are in the startup log line and the run summary)
SOURCES = ("spec", "config", "measured-gemm")
_SOURCE_WORDS = {"spec": "the device's dense datasheet peak",
                 "config": "logging.peak_tflops",
                 "measured-gemm": "a GEMM measured at start: no datasheet peak for this device"}


def source_words(code: int) -> Optional[str]:
    """What MFU divides by, in words, for a `mfu_peak_source` code (None for an unknown one)."""
    return _SOURCE_WORDS[SOURCES[code]] if 0 <= code < len(SOURCES) else None


def _words(name: str) -> set[str]:
    return set(re.findall(r"[A-Z0-9]+", name.upper()))


def find_device(name: str) -> Optional[DevicePeak]:
    """The table's row for a device name (`torch.cuda.get_device_name()`), or None."""
    have = _words(name)
    for row in TABLE:
        if all(w in have for w in row.words):
            return row
    return None


def dtype_key(dtype: torch.dtype, *, fp32_matmul_precision: str = "highest") -> str:
    """The table column a training dtype's matmuls run at: bf16 (bf16 and fp16), tf32 (fp32
    with `torch.get_float32_matmul_precision()` high or medium) or fp32."""
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    if dtype == torch.float32:
        return "fp32" if fp32_matmul_precision == "highest" else "tf32"
    raise ValueError(f"no peak column for dtype {dtype} (bfloat16 | float16 | float32)")


def spec_peak(name: str, dtype: torch.dtype, *, fp32_matmul_precision: str = "highest"
              ) -> Optional[tuple[float, str]]:
    """(dense peak TFLOP/s, label such as "H100 SXM bf16") of the named device in `dtype`;
    None for a device (or a dtype of it) the table does not hold."""
    row = find_device(name)
    if row is None:
        return None
    key = dtype_key(dtype, fp32_matmul_precision=fp32_matmul_precision)
    value = getattr(row, key)
    return None if value is None else (value, f"{row.label} {key}")


@dataclass(frozen=True)
class MfuPeak:
    """The MFU denominator of one device: `tflops`, where it came from (`source`, one of
    SOURCES) and the words that say so (`label`, e.g. "spec:H100 SXM bf16")."""

    tflops: float
    source: str
    label: str

    @property
    def code(self) -> int:
        return SOURCES.index(self.source)


def choose_peak(*, configured: Optional[float], device_name: Optional[str],
                dtype: torch.dtype, measured_gemm: float,
                fp32_matmul_precision: str = "highest") -> MfuPeak:
    """The MFU denominator: `logging.peak_tflops` when set (`configured`); else the table's
    dense peak of the device (`device_name`, None on CPU) in the training dtype; else the
    measured GEMM (`measured_gemm`, TFLOP/s), labelled as measured."""
    if configured is not None:
        return MfuPeak(float(configured), "config", "config")
    found = (spec_peak(device_name, dtype, fp32_matmul_precision=fp32_matmul_precision)
             if device_name else None)
    if found is not None:
        return MfuPeak(found[0], "spec", f"spec:{found[1]}")
    return MfuPeak(float(measured_gemm), "measured-gemm", "measured-gemm")


def device_name(device: torch.device) -> Optional[str]:
    """`torch.cuda.get_device_name` of a CUDA device; None on any other device."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_name(device)


__all__ = ["DevicePeak", "MfuPeak", "SOURCES", "TABLE", "choose_peak", "device_name",
           "dtype_key", "find_device", "source_words", "spec_peak"]
