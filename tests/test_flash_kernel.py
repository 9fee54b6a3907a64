"""Block flash attention (Triton) against the float64 PyTorch reference.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below
before anything imports triton) at tiny shapes with 16-wide tiles, so every length here
ends in a partial tile. Launcher outputs start as NaN, so an element a kernel never writes
fails the comparison. On a GPU the same tests run there, plus a bf16 test at a real size.

Legend: B batch, Tq / Tk query rows / key columns of the block, Hq / Hkv heads, D head dim;
`q_bthd` [B, Tq, Hq, D], `lse_bht` [B, Hq, Tq].
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from conftest import (BF16_RTOL, FP32_RTOL, assert_runs_without_triton,  # noqa: E402
                      rel_err, worst)
from longtrain_kernels import _launch_common  # noqa: E402
from longtrain_kernels.flash_attn import (attention_block_naive,  # noqa: E402
                                          attention_block_naive_backward, flash_attention,
                                          flash_block_backward, flash_block_forward)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
D = 16
SCALE = 0.3
NEG_INF = float("-inf")


@pytest.fixture(autouse=True)
def _nan_filled_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_launch_common, "DEBUG_FILL_NAN", True)


def _docs(runs: list[tuple[int, int]], batch: int) -> torch.Tensor:
    """[B, T] int64 document ids from (id, length) runs; batch row b adds 10 * b to the ids."""
    row = torch.cat([torch.full((n, ), doc) for doc, n in runs])
    return torch.stack([row + 10 * b for b in range(batch)]).to(DEVICE)


# Each case is one block. `other` describes a second key block of the same queries (another
# ring rank) that is merged in to make the global out / lse for the backward.
CASES: dict[str, dict[str, Any]] = {
    "dense_mqa": dict(B=1, Tq=13, Tk=40, Hq=2, Hkv=1, causal=False,
                      other=dict(Tk=24, k_offset=0)),
    "causal_gqa_diagonal": dict(B=1, Tq=40, Tk=40, Hq=4, Hkv=2, causal=True,
                                other=dict(Tk=24, k_offset=-24)),
    "causal_q_after_k": dict(B=1, Tq=13, Tk=40, Hq=2, Hkv=2, causal=True, q_offset=45,
                             other=dict(Tk=24, k_offset=40)),
    # Offsets chosen so that each causal tile bound sits one off a tile edge somewhere.
    "causal_offsets_unaligned": dict(B=1, Tq=40, Tk=56, Hq=2, Hkv=1, causal=True, q_offset=13,
                                     k_offset=12, block_m=32, other=dict(Tk=24, k_offset=-12)),
    # Rows 0..17 see no key of this block: whole rows and whole tiles are masked.
    "causal_q_before_k": dict(B=1, Tq=40, Tk=20, Hq=2, Hkv=1, causal=True, k_offset=18,
                              other=dict(Tk=24, k_offset=-6)),
    "causal_even_tiles": dict(B=1, Tq=32, Tk=48, Hq=2, Hkv=2, causal=True, q_offset=14,
                              other=dict(Tk=16, k_offset=48)),
    # Doc 5 exists in no key block (lse -inf everywhere); doc 0 only in the other block.
    "docs_causal_gqa": dict(B=2, Tq=40, Tk=40, Hq=4, Hkv=2, causal=True,
                            q_doc=[(5, 3), (0, 4), (1, 20), (2, 13)],
                            k_doc=[(1, 10), (2, 30)],
                            other=dict(Tk=24, k_offset=-24, k_doc=[(0, 12), (1, 12)])),
    "docs_dense_strided": dict(B=1, Tq=40, Tk=13, Hq=2, Hkv=1, causal=False, strided=True,
                               block_n=32, q_doc=[(5, 3), (0, 4), (1, 20), (2, 13)],
                               k_doc=[(1, 5), (2, 8)],
                               other=dict(Tk=24, k_offset=0, k_doc=[(0, 12), (3, 12)])),
}


def _rand(shape: tuple[int, ...], *, dtype: torch.dtype, strided: bool = False,
          gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float32).to(DEVICE, dtype)
    if strided:
        # A [B, T, H, D] view of a [B, H, T, D] tensor, as the attention code passes them.
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x


def _merge(out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor,
           lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LSE-weighted merge of two blocks' (out [B, Tq, H, D], lse [B, H, Tq]) in float64."""
    lse = torch.logaddexp(lse1, lse2)
    shift = torch.where(torch.isinf(lse), 0.0, lse)
    w1 = torch.exp(lse1 - shift).transpose(1, 2)[..., None]
    w2 = torch.exp(lse2 - shift).transpose(1, 2)[..., None]
    return out1 * w1 + out2 * w2, lse


def _opts(case: dict[str, Any], *, other: bool = False) -> dict[str, Any]:
    src = case["other"] if other else case
    docs = case.get("q_doc") is not None
    return dict(causal=case["causal"], q_offset=case.get("q_offset", 0),
                k_offset=src.get("k_offset", 0),
                q_doc=_docs(case["q_doc"], case["B"]) if docs else None,
                k_doc=_docs(src["k_doc"], case["B"]) if docs else None)


def _d64(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.double() for x in xs]


@pytest.mark.parametrize("name", list(CASES))
def test_block_matches_naive(name: str) -> None:
    """out, lse, and dq/dk/dv with the block's own and with a global (merged) out / lse."""
    case = CASES[name]
    gen = torch.Generator().manual_seed(sorted(CASES).index(name))
    b, tq, tk, hq, hkv = case["B"], case["Tq"], case["Tk"], case["Hq"], case["Hkv"]
    strided = case.get("strided", False)
    q = _rand((b, tq, hq, D), dtype=torch.float32, strided=strided, gen=gen)
    k, v = (_rand((b, tk, hkv, D), dtype=torch.float32, strided=strided, gen=gen)
            for _ in range(2))
    k2, v2 = (_rand((b, case["other"]["Tk"], hkv, D), dtype=torch.float32, gen=gen)
              for _ in range(2))
    dout = _rand((b, tq, hq, D), dtype=torch.float32, gen=gen)
    opts, opts2 = _opts(case), _opts(case, other=True)
    blocks = dict(block_m=case.get("block_m", 16), block_n=case.get("block_n", 16))

    out, lse = flash_block_forward(q, k, v, scale=SCALE, **opts, **blocks)
    ref_out, ref_lse = attention_block_naive(*_d64(q, k, v), scale=SCALE, **opts)
    empty = ref_lse == NEG_INF
    assert torch.equal(lse == NEG_INF, empty), "rows with lse -inf differ from the reference"
    assert torch.equal(out.transpose(1, 2)[empty], torch.zeros_like(out.transpose(1, 2)[empty]))
    errors = {"out": rel_err(out, ref_out), "lse": rel_err(lse[~empty], ref_lse[~empty])}

    grads = flash_block_backward(dout, q, k, v, out, lse, scale=SCALE, **opts, **blocks)
    ref_grads = attention_block_naive_backward(*_d64(dout, q, k, v, ref_out), ref_lse,
                                               scale=SCALE, **opts)
    for g_name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        errors[g_name] = rel_err(got, want)
    # Rows without keys: dq exactly 0 (and nothing NaN reached dk/dv: rel_err is inf then).
    assert torch.equal(grads[0].transpose(1, 2)[empty],
                       torch.zeros_like(grads[0].transpose(1, 2)[empty]))

    out2, lse2 = attention_block_naive(*_d64(q, k2, v2), scale=SCALE, **opts2)
    out_g, lse_g = _merge(ref_out, ref_lse, out2, lse2)
    grads_g = flash_block_backward(dout, q, k, v, out_g.float(), lse_g.float(), scale=SCALE,
                                   **opts, **blocks)
    ref_grads_g = attention_block_naive_backward(*_d64(dout, q, k, v), out_g, lse_g,
                                                 scale=SCALE, **opts)
    for g_name, got, want in zip(("dq", "dk", "dv"), grads_g, ref_grads_g):
        errors[f"{g_name} (global lse)"] = rel_err(got, want)

    bad, err = worst(errors)
    assert err <= FP32_RTOL, f"{name}: {bad} rel err {err:.2e} (all: {errors})"


def test_naive_backward_with_global_lse_is_exact_gradient() -> None:
    """The oracle itself: per-block grads with the merged out / lse sum to autograd of the
    whole attention (two key blocks with GQA, causal offsets and documents)."""
    gen = torch.Generator().manual_seed(7)
    b, tq, hq, hkv = 2, 12, 4, 2
    q, k, v = (torch.randn(b, t, h, D, generator=gen, dtype=torch.float64)
               for t, h in ((tq, hq), (20, hkv), (20, hkv)))
    q_doc = torch.tensor([[0] * 3 + [1] * 9, [2] * 12])
    k_doc = torch.tensor([[0] * 8 + [1] * 12, [1] * 6 + [2] * 14])
    opts = dict(scale=SCALE, causal=True, q_offset=14)
    q_, k_, v_ = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = attention_block_naive(q_, k_, v_, **opts, k_offset=2, q_doc=q_doc, k_doc=k_doc)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(dout)

    split = 9
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for lo, hi in ((0, split), (split, 20)):
        dq_i, dk_i, dv_i = attention_block_naive_backward(
            dout, q, k[:, lo:hi], v[:, lo:hi], out.detach(), lse.detach(), **opts,
            k_offset=2 + lo, q_doc=q_doc, k_doc=k_doc[:, lo:hi])
        dq += dq_i
        dks.append(dk_i)
        dvs.append(dv_i)
    errors = {"dq": rel_err(dq, q_.grad), "dk": rel_err(torch.cat(dks, 1), k_.grad),
              "dv": rel_err(torch.cat(dvs, 1), v_.grad)}
    bad, err = worst(errors)
    assert err <= FP32_RTOL, f"{bad} rel err {err:.2e}"


def test_tiles_sharing_no_document_are_skipped() -> None:
    """A ring block whose queries are all in document 1 and whose first 48 keys are document
    0: those key tiles hold NaN and are never read (out, lse, dq exact, dk / dv exactly 0
    there); a masked-but-computed tile would turn the whole output NaN (0 * NaN)."""
    gen = torch.Generator().manual_seed(21)
    b, tq, tk, hq, hkv = 1, 32, 96, 2, 1
    q = _rand((b, tq, hq, D), dtype=torch.float32, gen=gen)
    k, v = (_rand((b, tk, hkv, D), dtype=torch.float32, gen=gen) for _ in range(2))
    dout = _rand((b, tq, hq, D), dtype=torch.float32, gen=gen)
    opts = dict(causal=True, q_offset=100, k_offset=0,
                q_doc=_docs([(1, tq)], b), k_doc=_docs([(0, 48), (1, 48)], b))
    ref_out, ref_lse = attention_block_naive(*_d64(q, k, v), scale=SCALE, **opts)
    ref_grads = attention_block_naive_backward(*_d64(dout, q, k, v, ref_out), ref_lse,
                                               scale=SCALE, **opts)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :48], v_bad[:, :48] = float("nan"), float("nan")
    blocks = dict(block_m=16, block_n=16)
    out, lse = flash_block_forward(q, k_bad, v_bad, scale=SCALE, **opts, **blocks)
    dq, dk, dv = flash_block_backward(dout, q, k_bad, v_bad, out, lse, scale=SCALE, **opts,
                                      **blocks)
    assert rel_err(out, ref_out) <= FP32_RTOL and rel_err(lse, ref_lse) <= FP32_RTOL
    assert rel_err(dq, ref_grads[0]) <= FP32_RTOL
    for got, want in zip((dk, dv), ref_grads[1:]):
        assert torch.equal(got[:, :48], torch.zeros_like(got[:, :48]))
        assert rel_err(got[:, 48:], want[:, 48:]) <= FP32_RTOL


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    return t(torch.nn.functional.scaled_dot_product_attention(
        t(q), t(k), t(v), is_causal=causal, enable_gqa=True))


def test_flash_attention_matches_sdpa() -> None:
    """The autograd path (default scale) against PyTorch SDPA: causal GQA, and dense MQA."""
    gen = torch.Generator().manual_seed(11)
    errors = {}
    for causal, hq, hkv in ((True, 4, 2), (False, 2, 1)):
        q = _rand((1, 40, hq, D), dtype=torch.float32, gen=gen)
        k, v = (_rand((1, 40, hkv, D), dtype=torch.float32, gen=gen) for _ in range(2))
        dout = _rand((1, 40, hq, D), dtype=torch.float32, gen=gen)
        got, want = [], []
        for fn, res in ((lambda *a: flash_attention(*a, causal=causal), got),
                        (lambda *a: _sdpa(*a, causal=causal), want)):
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            out = fn(*leaves)
            out.backward(dout)
            res.extend([out.detach()] + [x.grad for x in leaves])
        for g_name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            errors[f"{g_name} causal={causal}"] = rel_err(a, b)
    bad, err = worst(errors)
    assert err <= FP32_RTOL, f"{bad} rel err {err:.2e} (all: {errors})"


def test_bad_arguments_name_the_values() -> None:
    q = torch.randn(1, 8, 3, D)
    k = torch.randn(1, 8, 2, D)
    with pytest.raises(ValueError, match="Hq=3"):
        flash_block_forward(q, k, k, scale=1.0)
    with pytest.raises(ValueError, match="D=24"):
        x = torch.randn(1, 8, 2, 24)
        flash_block_forward(x, x, x, scale=1.0)
    with pytest.raises(ValueError, match="block_m=24"):
        flash_block_forward(k, k, k, scale=1.0, block_m=24)
    with pytest.raises(ValueError, match="together"):
        flash_block_forward(k, k, k, scale=1.0, q_doc=torch.zeros(1, 8, dtype=torch.int32))


def test_the_kernels_setting_picks_the_block_implementation() -> None:
    """`train.kernels` reaches the ring's blocks: "triton" runs the kernel (here under the
    interpreter), "torch" the PyTorch path, "auto" the kernel only on CUDA; both agree."""
    from longtrain.attention.blocks import block_backward, block_forward
    from longtrain_kernels import resolve_kernels

    gen = torch.Generator().manual_seed(5)
    # [B, H, T, D], the blocks' layout
    q, k, v, dout = (_rand((1, 2, 24, D), dtype=torch.float32, gen=gen) for _ in range(4))
    assert resolve_kernels("auto", q) == ("triton" if q.is_cuda else "torch")
    assert resolve_kernels("torch", q) == "torch"
    assert resolve_kernels("triton", q) == "triton"
    with pytest.raises(ValueError, match="backend='cuda' must be one of"):
        resolve_kernels("cuda", q)
    got = {}
    for kernels in ("triton", "torch"):
        out, lse = block_forward(q, k, v, scale=SCALE, causal=True, kernels=kernels)
        grads = block_backward(dout, q, k, v, out, lse, scale=SCALE, causal=True,
                               kernels=kernels)
        got[kernels] = (out, lse, *grads)
    errors = {f"{name} triton vs torch": rel_err(a, b)
              for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *got.values())}
    bad, err = worst(errors)
    assert err <= FP32_RTOL, f"{bad} rel err {err:.2e} (all: {errors})"


def test_package_imports_without_triton() -> None:
    assert_runs_without_triton(
        "import longtrain_kernels.flash_attn as f; assert not f.available(); print('ok')")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("docs", [False, True])
def test_bf16_default_blocks_on_gpu(docs: bool) -> None:
    """bf16 at a real size with the default tiles, against the float64 reference."""
    gen = torch.Generator().manual_seed(3)
    b, t, hq, hkv, d = 1, 1024, 8, 2, 64
    q = _rand((b, t, hq, d), dtype=torch.bfloat16, gen=gen)
    k, v = (_rand((b, t, hkv, d), dtype=torch.bfloat16, gen=gen) for _ in range(2))
    dout = _rand((b, t, hq, d), dtype=torch.bfloat16, gen=gen)
    doc: Optional[torch.Tensor] = None
    if docs:
        doc = _docs([(0, 300), (1, 411), (2, 313)], b)
    scale = 1.0 / math.sqrt(d)
    opts = dict(scale=scale, causal=True, q_doc=doc, k_doc=doc)
    out, lse = flash_block_forward(q, k, v, **opts)
    ref_out, ref_lse = attention_block_naive(*_d64(q, k, v), **opts)
    grads = flash_block_backward(dout, q, k, v, out, lse, **opts)
    ref_grads = attention_block_naive_backward(*_d64(dout, q, k, v, ref_out), ref_lse, **opts)
    errors = {"out": rel_err(out, ref_out), "lse": rel_err(lse, ref_lse)}
    for g_name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        errors[g_name] = rel_err(got, want)
    bad, err = worst(errors)
    assert err <= BF16_RTOL, f"{bad} rel err {err:.2e} (all: {errors})"
