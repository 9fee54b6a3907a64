"""Group-wise int8 quantization (kernels/longtrain_kernels/int8_quant) against its float64 reference.

The PyTorch path must equal `quantize_naive` / `dequantize_naive` bit for bit (fp32, bf16,
fp16 and fp64 inputs, a ragged last group, a transposed view, group sizes 16, 64, 128), and
the round trip must stay within max|group| / 254 per element. The Triton kernels run in
Triton's CPU interpreter (TRITON_INTERPRET=1, set below before anything imports triton) at a
few thousand elements, or on the GPU when there is one, and must equal the PyTorch path bit
for bit. Launcher outputs start as NaN (scales, dequantized values) or -128 (q, a value the
kernel never stores), so an element a kernel never writes fails the comparison.

Legend: N elements, G group_size, NG = ceil(N / G) groups.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from conftest import assert_runs_without_triton  # noqa: E402
from longtrain_kernels import _launch_common  # noqa: E402
from longtrain_kernels.int8_quant import (dequantize, dequantize_naive, quantize,  # noqa: E402
                                          quantize_naive)
from longtrain_kernels.int8_quant import launch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton not importable")
# The round-trip bound absmax / 254 holds up to float32 rounding of the scale, the quotient
# and the product (a few 2^-24 of absmax): observed <= 1 + 5e-6 of the bound (fp16, bf16,
# fp32, fp64 inputs; G up to 4096).
BOUND_SLACK = 1e-4


@pytest.fixture(autouse=True)
def _nan_filled_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_launch_common, "DEBUG_FILL_NAN", True)


def _input(shape: tuple[int, ...], dtype: torch.dtype, seed: int, *,
           transposed: bool = False) -> torch.Tensor:
    """Random x [shape] on DEVICE whose magnitude varies along the flat order (groups get
    different scales); with `transposed`, a non-contiguous transposed view of a 2-d base."""
    gen = torch.Generator().manual_seed(seed)
    base_shape = shape[::-1] if transposed else shape
    n = math.prod(shape)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    x *= torch.exp(2 * torch.randn(-(-n // 16), generator=gen, dtype=torch.float64)
                   ).repeat_interleave(16)[:n]
    x = x.reshape(base_shape).to(DEVICE, dtype)
    return x.t() if transposed else x


def _quantize_both(x: torch.Tensor, g: int, backend: str) -> tuple[torch.Tensor, ...]:
    q, scale = quantize(x, g, backend=backend)
    q_ref, scale_ref = quantize_naive(x, g)
    return q, scale, q_ref, scale_ref


def _assert_scales(scale: torch.Tensor, scale_ref: torch.Tensor) -> None:
    assert scale.dtype == torch.float32 and scale.shape == scale_ref.shape
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)


# (shape, transposed): N = 1961 is ragged for every G; 1024 is a multiple of every G; 105 is
# one partial group at G = 128.
SHAPES = [((37, 53), True), ((4, 256), False), ((3, 5, 7), False), ((1000, ), False)]


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("g", [16, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,transposed", SHAPES)
def test_torch_path_matches_naive(shape: tuple[int, ...], transposed: bool,
                                  dtype: torch.dtype, g: int) -> None:
    seed = SHAPES.index((shape, transposed)) * 1000 + DTYPES.index(dtype) * 200 + g
    x = _input(shape, dtype, seed, transposed=transposed)
    assert x.is_contiguous() != transposed
    n, n_groups = x.numel(), -(-x.numel() // g)
    q, scale, q_ref, scale_ref = _quantize_both(x, g, "torch")
    assert q.dtype == torch.int8 and q.shape == (n_groups * g, )
    assert torch.equal(q, q_ref), f"{int((q != q_ref).sum())} of {n} q differ"
    _assert_scales(scale, scale_ref)
    assert not q[n:].any(), "padding of q must be 0"

    y = dequantize(q, scale, shape=x.shape, dtype=dtype, group_size=g, backend="torch")
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    y_ref = dequantize_naive(q, scale, shape=x.shape, dtype=dtype, group_size=g)
    assert torch.equal(y, y_ref)

    # Round trip in float32: |x - y| <= max|group| / 254 per element. Casting to a narrower
    # dtype adds that dtype's rounding: y is exactly the float32 result cast.
    y32 = dequantize(q, scale, shape=x.shape, dtype=torch.float32, group_size=g,
                     backend="torch")
    assert torch.equal(y, y32.to(dtype))
    x_flat = torch.zeros(n_groups * g, dtype=torch.float64, device=x.device)
    x_flat[:n] = x.reshape(-1).double()
    absmax = x_flat.view(n_groups, g).abs().amax(1).repeat_interleave(g)[:n]
    err = (x.reshape(-1).double() - y32.reshape(-1).double()).abs()
    bound = absmax / 254 * (1 + BOUND_SLACK)
    worst = int((err / absmax).argmax())
    assert bool((err <= bound).all()), \
        f"element {worst}: err {float(err[worst]):.3e} > absmax/254 = {float(bound[worst]):.3e}"


def _backends() -> list:
    return ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", _backends())
def test_zero_group_and_padding(backend: str) -> None:
    """A zero group inside random data: scale 0, q 0, dequantized exactly 0, no NaN."""
    g = 16
    x = _input((7 * g + 5, ), torch.float32, seed=11)
    x[3 * g:4 * g] = 0
    q, scale, q_ref, scale_ref = _quantize_both(x, g, backend)
    assert torch.equal(q, q_ref)
    _assert_scales(scale, scale_ref)
    assert scale[3] == 0 and not q[3 * g:4 * g].any()
    assert bool((scale[torch.arange(8, device=x.device) != 3] > 0).all())
    assert not q[x.numel():].any(), "padding of q must be 0"
    y = dequantize(q, scale, shape=x.shape, dtype=torch.float32, group_size=g, backend=backend)
    assert not torch.isnan(y).any()
    assert not y[3 * g:4 * g].any()


@pytest.mark.parametrize("backend", _backends())
def test_ties_round_to_even(backend: str) -> None:
    """Random k + 0.5 in a group whose max is 127 (scale exactly 1) round to even."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randint(-127, 127, (64, ), generator=gen).float() + 0.5
    x[::16] = 127.0
    q, scale = quantize(x.to(DEVICE), 16, backend=backend)
    assert bool((scale == 1).all())
    assert torch.equal(q.cpu(), torch.round(x).to(torch.int8))
    assert not bool((q.cpu().long() % 2 != 0)[x.frac() != 0].any())


# Interpreter-sized cases: (shape, transposed, dtype, G, block_groups). block_groups 4 gives
# several programs with a partial last one; None takes the default (one program here).
TRITON_CASES = {
    "fp32_ragged_blocks": ((2500, ), False, torch.float32, 64, 4),
    "fp32_ragged_default": ((37, 53), True, torch.float32, 16, None),
    "bf16_g128": ((3, 700), False, torch.bfloat16, 128, 2),
    "fp64_g16": ((1000, ), False, torch.float64, 16, 8),
    "fp16_g32": ((24, 40), False, torch.float16, 32, None),
}


@needs_triton
@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_matches_torch_path(name: str) -> None:
    shape, transposed, dtype, g, block_groups = TRITON_CASES[name]
    x = _input(shape, dtype, seed=list(TRITON_CASES).index(name), transposed=transposed)
    q_ref, scale_ref = quantize(x, g, backend="torch")
    outs = {"quantize": quantize(x, g, backend="triton"),
            "launcher": launch.quantize_triton(x, g, block_groups=block_groups)}
    for how, (q, scale) in outs.items():
        assert torch.equal(q, q_ref), f"{how}: {int((q != q_ref).sum())} q differ"
        _assert_scales(scale, scale_ref)
    for out_dtype in (dtype, torch.float32):
        kw = dict(shape=x.shape, dtype=out_dtype, group_size=g)
        want = dequantize(q_ref, scale_ref, backend="torch", **kw)
        got = {"dequantize": dequantize(q_ref, scale_ref, backend="triton", **kw),
               "launcher": launch.dequantize_triton(q_ref, scale_ref, block_groups=block_groups,
                                                    **kw)}
        for how, y in got.items():
            assert y.dtype == out_dtype and y.shape == x.shape
            assert torch.equal(y, want), f"{how} {out_dtype}: max diff " \
                                         f"{float((y.double() - want.double()).abs().max())}"


def test_auto_backend_on_cpu_is_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("auto took the Triton path for a CPU tensor")

    monkeypatch.setattr(launch, "quantize_triton", fail)
    monkeypatch.setattr(launch, "dequantize_triton", fail)
    x = _input((300, ), torch.float32, seed=13).cpu()
    q, scale = quantize(x, 32)
    y = dequantize(q, scale, shape=x.shape, dtype=x.dtype, group_size=32)
    assert torch.equal(y, dequantize_naive(q, scale, shape=x.shape, dtype=x.dtype,
                                           group_size=32))


def test_bad_arguments_name_the_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _input((100, ), torch.float32, seed=14).cpu()
    q, scale = quantize(x, 16)
    for g in (24, 8, 8192, 16.0):
        with pytest.raises(ValueError, match=f"group_size={g}"):
            quantize(x, g)
    with pytest.raises(ValueError, match="x must be .*int64"):
        quantize(torch.arange(20), 16)
    with pytest.raises(ValueError, match="backend='cuda'"):
        quantize(x, 16, backend="cuda")
    good = dict(q=q, scale=scale, shape=x.shape, dtype=x.dtype, group_size=16)
    cases = [
        ("group_size=24", dict(group_size=24)),
        ("q must be a 1-d int8 .*torch.int32", dict(q=q.int())),
        (r"q must be a 1-d int8 .*\(7, 16\)", dict(q=q.view(7, 16))),
        ("q has 112 elements, not a multiple of group_size=32", dict(group_size=32)),
        (r"scale must be float32 .*\[7\].*torch.float64", dict(scale=scale.double())),
        (r"scale must be float32 .*\[7\].*\(6,\)", dict(scale=scale[:6])),
        (r"shape=\(113,\) has 113 elements", dict(shape=(113, ))),
        (r"shape=\(2, 48\) has 96 elements", dict(shape=(2, 48))),
        (r"shape=\(-1, 100\)", dict(shape=(-1, 100))),
        ("dtype=torch.int8", dict(dtype=torch.int8)),
        ("backend='cuda'", dict(backend="cuda")),
    ]
    for match, change in cases:
        with pytest.raises(ValueError, match=match):
            dequantize(**(good | change))
    # Forcing Triton on a CPU tensor needs the interpreter (and triton).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs"):
        quantize(x, 16, backend="triton")


def test_package_imports_without_triton() -> None:
    assert_runs_without_triton(
        "import longtrain_kernels.int8_quant as m; assert not m.available(); "
        "x = torch.randn(3, 50); q, s = m.quantize(x, 16); "
        "y = m.dequantize(q, s, shape=x.shape, dtype=x.dtype, group_size=16); "
        "assert (x - y).abs().max() <= x.abs().max() / 254 * 1.001\n"
        "try:\n    m.quantize(x, 16, backend='triton')\n"
        "except ValueError as e:\n    assert 'not importable' in str(e)\n"
        "else:\n    raise AssertionError('no error')\n"
        "print('ok')")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_gpu_default_blocks(dtype: torch.dtype) -> None:
    """The compiled kernels (auto backend, default blocks) at a real size, ragged and
    transposed, against the PyTorch path on the same GPU and the float64 reference."""
    x = _input((4099, 1000), dtype, seed=15, transposed=True)
    for g in (16, 128, 4096):
        q, scale = quantize(x, g)
        q_ref, scale_ref = quantize(x, g, backend="torch")
        assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
        q_naive, scale_naive = quantize_naive(x, g)
        assert torch.equal(q, q_naive)
        _assert_scales(scale, scale_naive)
        y = dequantize(q, scale, shape=x.shape, dtype=dtype, group_size=g)
        assert torch.equal(y, dequantize(q, scale, shape=x.shape, dtype=dtype, group_size=g,
                                         backend="torch"))
