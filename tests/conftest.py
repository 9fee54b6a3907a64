"""Shared test helpers. Tolerances live here, and only here.

Relative error is max|a - b| / max|b| with an absolute floor on the denominator, so a
reference that is (close to) all zeros does not turn rounding noise into a huge ratio.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

# float32 production code against a float64 oracle (plain PyTorch Llama): observed <= ~1e-6.
FP32_RTOL = 2e-5
# Two float32 layouts of the same training step (TP / DP / micro-batch splits): only the order
# of reductions differs.
LAYOUT_RTOL = 1e-5
# The first AdamW update is lr * g / (|g| + eps): about lr * sign(g), independent of the
# gradient's size, except where |g| is near eps = 1e-8. There the rounding differences of two
# layouts (~1e-7 of the largest gradient) move the update by a visible fraction of lr:
# observed <= 6e-4 of the largest update. A wrong update (sign, lr, a skipped shard) is O(1).
ADAM_UPDATE_RTOL = 5e-3
# A float32 model with its decoder layers compiled (inductor) against eager: the fused kernels
# reorder reductions (RMSNorm's mean, the matmul epilogues); observed <= ~1e-6 on the tiny
# model. Wrong fusion (a dropped term, a wrong RoPE half) is O(1).
COMPILE_RTOL = 1e-5
# bf16 forward/backward against float32: 8 mantissa bits.
BF16_RTOL = 3e-2
# Two bf16 runs whose compute weights round from the same fp32 masters (plain mixed precision
# and FSDP's bf16 gather): the gradient sums differ in order and in fp32 vs bf16 staging;
# observed <= ~5e-4 on the loss over 20 steps. A wrong shard or scale is O(1).
BF16_LAYOUT_RTOL = 2e-3
# Denominator floor of rel_err.
ABS_FLOOR = 1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor, *, floor: float = ABS_FLOOR) -> float:
    """max|a - b| / max(max|b|, floor), computed in float64; `b` is the reference."""
    a64, b64 = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if a64.shape != b64.shape:
        raise AssertionError(f"shape {tuple(a64.shape)} vs reference {tuple(b64.shape)}")
    if a64.numel() == 0:
        return 0.0
    if not torch.isfinite(a64).all():
        return float("inf")
    return float((a64 - b64).abs().max() / max(float(b64.abs().max()), floor))


def worst(errors: dict[str, float]) -> tuple[str, float]:
    """(name, error) of the largest entry, for assertion messages."""
    name = max(errors, key=errors.__getitem__)
    return name, errors[name]


def assert_runs_without_triton(code: str) -> None:
    """Run `code` in a fresh interpreter where `import triton` fails (and the Triton
    interpreter is off); it must print exactly 'ok'."""
    code = "import sys, torch; sys.modules['triton'] = None; " + code
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
