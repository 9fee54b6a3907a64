"""S2-Attention (kernels/longtrain_kernels/s2_attn) against its dense float64 reference.

The pattern's coverage is checked against a brute-force union of head masks; the PyTorch
block path in float64 (outputs, lse and every gradient) against `s2_reference` with autograd,
and shown to read only allowed blocks (a schedule counter, and NaN in every key block no
query may read); the Triton kernels the same way in Triton's CPU interpreter
(TRITON_INTERPRET=1, set below before anything imports triton) at block 16-32, T <= 128,
D = 16, with outputs pre-filled with NaN; on a GPU also in bf16 at block 64, D = 64, T = 1024.

Legend: B batch, Tq query rows, Tk keys, Hq / Hkv heads, D head dim; `q_bthd` [B, Tq, Hq, D].
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from typing import Any, Optional

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from conftest import BF16_RTOL, FP32_RTOL, rel_err, worst  # noqa: E402
from longtrain_kernels import _launch_common  # noqa: E402
from longtrain_kernels.s2_attn import (S2Pattern, s2_attention, s2_attention_lse,  # noqa: E402
                                       s2_reference_lse)
from longtrain_kernels.s2_attn.blocked import plan, plan_tiles  # noqa: E402

# float64 block path against the float64 dense reference: only summation order differs.
F64_RTOL = 1e-10
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _nan_filled_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_launch_common, "DEBUG_FILL_NAN", True)


COVERAGE: dict[str, tuple[S2Pattern, bool]] = {
    "h8_vs8": (S2Pattern(8, vert_stride=8), True),
    "h4_vs4_local2": (S2Pattern(4, local_blocks=2, vert_stride=4), True),
    "h16_vs8": (S2Pattern(16, vert_stride=8), True),
    "homo_one_dense": (S2Pattern(4, homo_head=True, num_dense_heads=1), True),
    # head_step = 2: phases 7, 5, 3, 1 only; the even blocks beyond the window are uncovered.
    "h4_vs8_no_dense": (S2Pattern(4, vert_stride=8), False),
    "homo_no_dense": (S2Pattern(4, local_blocks=2, vert_stride=4, homo_head=True), False),
}


@pytest.mark.parametrize("name", list(COVERAGE))
def test_pattern_coverage_matches_brute_force(name: str) -> None:
    pat, covered = COVERAGE[name]
    n = 3 * pat.vert_stride + pat.local_blocks
    heads = range(pat.num_heads)
    mask = pat.block_mask(n, n, heads)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    brute = sorted(map(tuple, (causal & ~mask.any(0)).nonzero().tolist()))
    assert pat.uncovered(n) == brute
    assert (not brute) == covered
    step = pat.head_step()
    for g in heads:
        r = pat.vertical_phase(g)
        assert all(((j + g * step + 1) % pat.vert_stride == 0) == (j % pat.vert_stride == r)
                   for j in range(n))
        for i in range(n):
            assert pat.key_blocks(i, g) == mask[g, i].nonzero().flatten().tolist()
            assert all(pat.block_allowed(i, j, g) == bool(mask[g, i, j]) for j in range(n))
    # A later query chunk sees the same rows of the mask.
    assert torch.equal(pat.block_mask(4, n, heads, q_block_offset=n - 4), mask[:, n - 4:])


def test_pattern_problems_name_fields() -> None:
    assert S2Pattern(8).problems() == []
    bad = S2Pattern(2, block_size=24, local_blocks=0, vert_stride=0, num_dense_heads=3)
    text = "\n".join(bad.problems())
    for field in ("attention.s2.block_size=24", "attention.s2.local_blocks=0",
                  "attention.s2.vert_stride=0", "attention.s2.num_dense_heads=3"):
        assert field in text
    assert "attention.s2.block_size=8" in "".join(S2Pattern(2, block_size=8).problems())
    assert "attention.s2.num_heads=0" in "".join(S2Pattern(0).problems())


def _docs(runs: list[tuple[int, int]], batch: int) -> torch.Tensor:
    """[B, T] int64 document ids from (id, length) runs; batch row b adds 10 * b to the ids."""
    row = torch.cat([torch.full((n, ), doc) for doc, n in runs])
    return torch.stack([row + 10 * b for b in range(batch)]).to(DEVICE)


# Tk keys at 0 .. Tk - 1; queries are rows q_start .. q_start + Tq - 1 of the same sequence.
CASES: dict[str, dict[str, Any]] = {
    "gqa": dict(pattern=S2Pattern(4, block_size=16, local_blocks=2, vert_stride=4),
                B=2, Tq=128, Tk=128, Hq=4, Hkv=2),
    "head_offset_dense_head": dict(
        pattern=S2Pattern(8, block_size=16, local_blocks=2, vert_stride=4, num_dense_heads=1),
        B=1, Tq=128, Tk=128, Hq=4, Hkv=1, head_offset=4),
    "later_chunk": dict(pattern=S2Pattern(8, block_size=16, local_blocks=2, vert_stride=8),
                        B=1, Tq=64, Tk=192, Hq=2, Hkv=2, q_start=96, head_offset=2),
    # Boundaries inside blocks (37, 101) and on a block edge (64).
    "documents": dict(pattern=S2Pattern(4, block_size=16, local_blocks=2, vert_stride=4,
                                        num_dense_heads=1),
                      B=2, Tq=64, Tk=128, Hq=4, Hkv=2, q_start=64,
                      docs=[(0, 37), (1, 27), (2, 37), (3, 27)]),
    "homo_head": dict(pattern=S2Pattern(4, block_size=32, local_blocks=1, vert_stride=2,
                                        homo_head=True),
                      B=1, Tq=128, Tk=128, Hq=4, Hkv=2),
}


def _inputs(case: dict[str, Any], dtype: torch.dtype, seed: int
            ) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    b, tq, tk, hq, hkv = case["B"], case["Tq"], case["Tk"], case["Hq"], case["Hkv"]
    d = case.get("D", 16)
    qkv = [torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
           for shape in ((b, tq, hq, d), (b, tk, hkv, d), (b, tk, hkv, d))]
    dout = torch.randn((b, tq, hq, d), generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    q_start = case.get("q_start", 0)
    opts: dict[str, Any] = dict(head_offset=case.get("head_offset", 0), q_start=q_start)
    if "docs" in case:
        k_doc = _docs(case["docs"], b)[:, :tk]
        opts.update(q_doc=k_doc[:, q_start:q_start + tq], k_doc=k_doc)
    return qkv, dout, opts


def _compare(case: dict[str, Any], *, dtype: torch.dtype, backend: str, seed: int,
             poison: Optional[torch.Tensor] = None) -> dict[str, float]:
    """rel errors of out, lse, dq, dk, dv against the float64 reference (autograd)."""
    qkv, dout, opts = _inputs(case, dtype, seed)
    pat = case["pattern"]
    ref_in = [x.double().requires_grad_() for x in qkv]
    ref_out, ref_lse = s2_reference_lse(*ref_in, pat, **opts)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout.double())
    if poison is not None:
        # Key blocks no query may read become NaN: any read of them shows in out or grads.
        qkv[1] = qkv[1].masked_fill(poison, float("nan"))
        qkv[2] = qkv[2].masked_fill(poison, float("nan"))
    leaves = [x.clone().requires_grad_() for x in qkv]
    out = s2_attention(*leaves, pat, backend=backend, **opts)
    grads = torch.autograd.grad(out, leaves, dout)
    _, lse = s2_attention_lse(*qkv, pat, backend=backend, **opts)
    errors = {"out": rel_err(out, ref_out), "lse": rel_err(lse, ref_lse)}
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        if poison is not None and name != "dq":
            assert torch.equal(got[poison.expand_as(got)], torch.zeros_like(got)[
                poison.expand_as(got)]), f"{name} of an unread key block is not 0"
        errors[name] = rel_err(got, want)
    return errors


@pytest.mark.parametrize("name", list(CASES))
def test_torch_path_matches_reference_float64(name: str) -> None:
    errors = _compare(CASES[name], dtype=torch.float64, backend="torch",
                      seed=sorted(CASES).index(name))
    bad, err = worst(errors)
    assert err <= F64_RTOL, f"{name}: {bad} rel err {err:.2e} (all: {errors})"


def test_torch_path_float32_and_tensor_parallel_slices() -> None:
    """float32 against the reference; two head slices (TP=2) give exactly the TP=1 result."""
    case = CASES["head_offset_dense_head"]
    errors = _compare(case, dtype=torch.float32, backend="torch", seed=5)
    bad, err = worst(errors)
    assert err <= FP32_RTOL, f"float32 {bad} rel err {err:.2e} (all: {errors})"

    pat = S2Pattern(4, block_size=16, local_blocks=2, vert_stride=4, num_dense_heads=1)
    (q, k, v), _, _ = _inputs(dict(B=1, Tq=64, Tk=64, Hq=4, Hkv=2), torch.float64, 6)
    full = s2_attention(q, k, v, pat, backend="torch")
    halves = [s2_attention(q[:, :, 2 * r:2 * r + 2], k[:, :, r:r + 1], v[:, :, r:r + 1], pat,
                           head_offset=2 * r, backend="torch") for r in range(2)]
    # Equal up to rounding: a slice's chunks may pad rows to a different slot count.
    assert rel_err(torch.cat(halves, dim=2), full) <= F64_RTOL


def _unread_key_blocks(pat: S2Pattern, *, head: int, q_start: int, tk: int) -> torch.Tensor:
    """Bool [1, Tk, 1, 1]: keys of the blocks no query block from q_start on may read."""
    bs = pat.block_size
    n_k = tk // bs
    read = pat.block_mask(n_k - q_start // bs, n_k, [head], q_block_offset=q_start // bs).any(1)
    return (~read[0]).repeat_interleave(bs).view(1, tk, 1, 1).to(DEVICE)


POISON_CASE = dict(pattern=S2Pattern(4, block_size=16, local_blocks=2, vert_stride=4),
                   B=1, Tq=64, Tk=128, Hq=1, Hkv=1, q_start=64, head_offset=1)


def test_torch_path_skips_disallowed_blocks() -> None:
    """Schedule size well below dense; NaN in unread key blocks never reaches any result."""
    n = 128
    for dense_heads, most in ((0, 0.25), (1, 0.35)):
        pat = S2Pattern(8, block_size=64, local_blocks=4, vert_stride=8,
                        num_dense_heads=dense_heads)
        chunks = plan(pat, batch=1, num_q_heads=8, head_offset=0, q_block0=0, n_q_blocks=n)
        tiles = plan_tiles(chunks, batch=1, local_blocks=4)
        allowed = int(pat.block_mask(n, n, range(8)).sum())
        dense = 8 * n * (n + 1) // 2
        # A sparse row reads ~4 + i / 8 of its i + 1 causal blocks; padding stays small.
        assert allowed <= tiles <= 1.1 * allowed, (dense_heads, tiles, allowed)
        assert tiles <= most * dense, (dense_heads, tiles, dense)

    case = POISON_CASE
    poison = _unread_key_blocks(case["pattern"], head=1, q_start=64, tk=128)
    # Head 1 has phase 2: of key blocks 0 .. 7, queries in blocks 4 .. 7 never read 0 and 1.
    assert int(poison.sum()) == 32
    errors = _compare(case, dtype=torch.float64, backend="torch", seed=9, poison=poison)
    bad, err = worst(errors)
    assert err <= F64_RTOL, f"{bad} rel err {err:.2e} (all: {errors})"


TRITON_CASES = ["gqa", "head_offset_dense_head", "documents", "homo_head"]


@needs_triton
@pytest.mark.parametrize("name", TRITON_CASES)
def test_triton_matches_reference(name: str) -> None:
    errors = _compare(CASES[name], dtype=torch.float32, backend="triton",
                      seed=sorted(CASES).index(name))
    bad, err = worst(errors)
    assert err <= FP32_RTOL, f"{name}: {bad} rel err {err:.2e} (all: {errors})"


@needs_triton
def test_triton_reads_only_allowed_blocks() -> None:
    poison = _unread_key_blocks(POISON_CASE["pattern"], head=1, q_start=64, tk=128)
    errors = _compare(POISON_CASE, dtype=torch.float32, backend="triton", seed=9,
                      poison=poison)
    bad, err = worst(errors)
    assert err <= FP32_RTOL, f"{bad} rel err {err:.2e} (all: {errors})"


def _read_blocks(case: dict[str, Any]) -> tuple[int, ...]:
    """Every key block the case's queries read through any of its heads (and their own)."""
    pat, bs = case["pattern"], case["pattern"].block_size
    q0 = case.get("q_start", 0) // bs
    heads = range(case.get("head_offset", 0), case.get("head_offset", 0) + case["Hq"])
    return tuple(sorted({j for i in range(q0, q0 + case["Tq"] // bs) for g in heads
                         for j in pat.key_blocks(i, g)}))


@pytest.mark.parametrize("backend,name", [
    ("torch", "later_chunk"), ("torch", "documents"), ("torch", "head_offset_dense_head"),
    pytest.param("triton", "later_chunk", marks=needs_triton),
    pytest.param("triton", "documents", marks=needs_triton)])
def test_compact_key_blocks_equal_the_full_keys(backend: str, name: str) -> None:
    """k / v holding only the read blocks (`k_blocks`, what a CP rank receives) give the full
    call's output and dq, and its dk / dv on those blocks (the others' are zero there)."""
    case = dict(CASES[name])
    if name == "documents":  # without its dense head, so that some blocks go unread
        case["pattern"] = S2Pattern(4, block_size=16, local_blocks=2, vert_stride=8)
    dtype = torch.float64 if backend == "torch" else torch.float32
    (q, k, v), dout, opts = _inputs(case, dtype, seed=11)
    pat, bs = case["pattern"], case["pattern"].block_size
    blocks = _read_blocks(case)
    # a dense head reads every block: the compact keys are all of them
    assert (len(blocks) == case["Tk"] // bs) == (name == "head_offset_dense_head")
    keys = torch.cat([torch.arange(b * bs, (b + 1) * bs) for b in blocks]).to(DEVICE)
    full_in = [x.clone().requires_grad_() for x in (q, k, v)]
    full = s2_attention(*full_in, pat, backend=backend, **opts)
    full_grads = torch.autograd.grad(full, full_in, dout)
    compact_opts = dict(opts)
    if "k_doc" in opts:
        compact_opts["k_doc"] = opts["k_doc"][:, keys]
    leaves = [q.clone().requires_grad_(), k[:, keys].clone().requires_grad_(),
              v[:, keys].clone().requires_grad_()]
    out = s2_attention(*leaves, pat, k_blocks=blocks, backend=backend, **compact_opts)
    grads = torch.autograd.grad(out, leaves, dout)
    tol = F64_RTOL if dtype == torch.float64 else FP32_RTOL
    assert rel_err(out, full) <= tol
    assert rel_err(grads[0], full_grads[0]) <= tol
    for got, want in zip(grads[1:], full_grads[1:]):
        assert rel_err(got, want[:, keys]) <= tol
        unread = torch.ones(want.shape[1], dtype=torch.bool, device=DEVICE)
        unread[keys] = False
        assert not bool(want[:, unread].any())
    _, lse = s2_attention_lse(q, k[:, keys], v[:, keys], pat, k_blocks=blocks,
                              backend=backend, **compact_opts)
    _, full_lse = s2_attention_lse(q, k, v, pat, backend=backend, **opts)
    assert rel_err(lse, full_lse) <= tol


def test_bad_key_blocks_are_named() -> None:
    pat = S2Pattern(4, block_size=16)
    q = torch.randn(1, 32, 2, 16)
    kv = torch.randn(1, 48, 1, 16)
    for blocks, match in (((0, 1), "names 2 blocks of 16, but k holds Tk=48"),
                          ((2, 1, 3), "ascending"), ((0, 1, 2), "missing \\[3\\]")):
        with pytest.raises(ValueError, match=match):
            s2_attention(q, kv, kv, pat, q_start=32, k_blocks=blocks, backend="torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("docs", [False, True])
def test_triton_bf16_on_gpu(docs: bool) -> None:
    """bf16 at block 64, D 64, T 1024 on a TP head slice with a dense head, against the
    float64 reference (out, lse and every gradient)."""
    case: dict[str, Any] = dict(
        pattern=S2Pattern(16, block_size=64, local_blocks=4, vert_stride=8, num_dense_heads=1),
        B=1, Tq=1024, Tk=1024, Hq=8, Hkv=2, D=64, head_offset=8)
    if docs:
        case["docs"] = [(0, 300), (1, 411), (2, 313)]
    errors = _compare(case, dtype=torch.bfloat16, backend="triton", seed=3)
    bad, err = worst(errors)
    assert err <= BF16_RTOL, f"{bad} rel err {err:.2e} (all: {errors})"


def test_bad_arguments_name_the_argument() -> None:
    pat = S2Pattern(4, block_size=16)
    q = torch.randn(1, 32, 2, 16)
    kv = torch.randn(1, 64, 1, 16)
    doc = torch.zeros(1, 32, dtype=torch.long)
    calls = {
        "q_start=8": dict(q_start=8),
        "Tq=24": dict(q=torch.randn(1, 24, 2, 16)),
        "Tk=40": dict(k=torch.randn(1, 40, 1, 16), v=torch.randn(1, 40, 1, 16)),
        r"Tk=64 must cover": dict(q_start=48),
        "head_offset=3": dict(head_offset=3),
        "Hq=2 must be a multiple": dict(k=torch.randn(1, 64, 3, 16), v=torch.randn(1, 64, 3, 16)),
        "together": dict(q_doc=doc),
        r"q_doc \(1, 32\)": dict(q_doc=doc, k_doc=doc),
        "vert_stride=0": dict(pattern=S2Pattern(4, block_size=16, vert_stride=0)),
        "backend='cuda'": dict(backend="cuda"),
    }
    for match, over in calls.items():
        args: dict[str, Any] = dict(q=q, k=kv, v=kv, pattern=pat, backend="torch")
        args.update(over)
        with pytest.raises(ValueError, match=match):
            s2_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("pattern"),
                         **args)
    if HAS_TRITON:
        with pytest.raises(ValueError, match="float64"):
            s2_attention(q.double(), kv.double(), kv.double(), pat, backend="triton")
        with pytest.raises(ValueError, match="D=8"):
            x = torch.randn(1, 32, 1, 8)
            s2_attention(x, x, x, pat, backend="triton")


def test_package_imports_without_triton() -> None:
    code = ("import sys; sys.modules['triton'] = None; import torch; "
            "import longtrain_kernels.s2_attn as s; assert not s.available(); "
            "p = s.S2Pattern(2, block_size=16); x = torch.randn(1, 32, 2, 16); "
            "o = s.s2_attention(x, x, x, p); assert o.shape == x.shape; print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
