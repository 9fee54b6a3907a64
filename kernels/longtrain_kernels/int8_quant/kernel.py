"""Triton kernels for group-wise int8 quantization (one float32 scale per GROUP elements).

Legend: N elements, GROUP elements per group, NG = ceil(N / GROUP) groups, BLOCK_GROUPS
groups per program. Each program owns BLOCK_GROUPS consecutive groups as a
[BLOCK_GROUPS, GROUP] tile of the flat input. Offsets are int64 (activations can exceed
2^31 elements). Everything is computed in float32 with IEEE-exact operations so that the
results equal the PyTorch path bit for bit: `div_rn` (Triton's `/` on float32 is an
approximate division on GPUs) and an explicit round-half-to-even (libdevice `rint` does not
run in the interpreter). Host code lives in launch.py.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_half_even(y):
    """int32 nearest integer of float32 y (|y| < 2^23), ties to even, like torch.round.

    On the magnitude (rounding is symmetric), where a - floor(a) is exact.
    """
    a = tl.abs(y)
    f = tl.floor(a)
    frac = a - f
    r = f.to(tl.int32)
    r += ((frac > 0.5) | ((frac == 0.5) & ((r & 1) == 1))).to(tl.int32)
    return tl.where(y < 0.0, -r, r)


@triton.jit
def _tile(pid, GROUP: tl.constexpr, BLOCK_GROUPS: tl.constexpr):
    """(group ids [BLOCK_GROUPS], their groups' element offsets [BLOCK_GROUPS, GROUP])."""
    groups = pid.to(tl.int64) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
    offs = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    return groups, offs


@triton.jit
def quantize_kernel(X, Q, SCALE, N, NG, GROUP: tl.constexpr, BLOCK_GROUPS: tl.constexpr):
    """X [N] any float dtype -> Q int8 [NG * GROUP] (0 past N), SCALE float32 [NG].

    scale = max |x| / 127 per group; q = round-half-even(x / scale) clamped to [-127, 127];
    an all-zero group (also the padding) gets scale 0 and q 0.
    """
    groups, offs = _tile(tl.program_id(0), GROUP, BLOCK_GROUPS)
    x = tl.load(X + offs, mask=offs < N, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), 127.0)
    divisor = tl.where(scale > 0.0, scale, 1.0)
    y = tl.math.div_rn(x, divisor[:, None])
    q = tl.minimum(tl.maximum(_round_half_even(y), -127), 127)
    # The padding of the last group loaded zeros, so it stores q = 0.
    tl.store(Q + offs, q.to(tl.int8), mask=groups[:, None] < NG)
    tl.store(SCALE + groups, scale, mask=groups < NG)


@triton.jit
def _to_bf16_rne(x):
    """float32 -> bfloat16, round to nearest even, on the bits (finite x). The interpreter's
    float32 -> bfloat16 cast truncates; compiled, the cast already rounds to nearest even."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def dequantize_kernel(Q, SCALE, OUT, N, NG, GROUP: tl.constexpr,
                      BLOCK_GROUPS: tl.constexpr, OUT_BF16: tl.constexpr):
    """Q int8 [NG * GROUP], SCALE float32 [NG] -> OUT [N] (its dtype) = q * scale in float32,
    cast to OUT's dtype rounding to nearest even. OUT_BF16: OUT is bfloat16."""
    groups, offs = _tile(tl.program_id(0), GROUP, BLOCK_GROUPS)
    scale = tl.load(SCALE + groups, mask=groups < NG, other=0.0)
    q = tl.load(Q + offs, mask=offs < N, other=0).to(tl.float32)
    out = q * scale[:, None]
    if OUT_BF16:
        out = _to_bf16_rne(out)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=offs < N)
