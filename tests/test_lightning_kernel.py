"""Lightning attention (causal linear attention with decay) against the float64 recurrence.

The blocked PyTorch path runs on CPU in float64 and float32; the Triton kernels run in
Triton's CPU interpreter (TRITON_INTERPRET=1, set below before anything imports triton) at
tiny shapes with 16-long blocks, or on the GPU when there is one. Every comparison covers o,
the final state, and dq / dk / dv of a random weighted sum of o plus a random weighted sum of
the state, against autograd through `lightning_attention_naive`. Launcher outputs start as
NaN, so an element a kernel never writes fails the comparison.

Legend: B batch, T sequence length, H heads, Dk / Dv key and value dims; `q_bthd`
[B, T, H, Dk], `state_bhkv` [B, H, Dk, Dv].
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable, Optional

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from conftest import (BF16_RTOL, FP32_RTOL, assert_runs_without_triton,  # noqa: E402
                      rel_err, worst)
from longtrain_kernels import _launch_common  # noqa: E402
from longtrain_kernels.lightning_attn import (lightning_attention,  # noqa: E402
                                              lightning_attention_naive,
                                              lightning_attention_torch, lightning_backward,
                                              lightning_forward)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton not importable")

Outputs = tuple[torch.Tensor, torch.Tensor]


@pytest.fixture(autouse=True)
def _nan_filled_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_launch_common, "DEBUG_FILL_NAN", True)


def _docs(rows: list[list[tuple[int, int]]], *, device: torch.device) -> torch.Tensor:
    """[B, T] int64 document ids, one list of (id, length) runs per batch row."""
    return torch.stack([torch.cat([torch.full((n, ), doc) for doc, n in runs])
                        for runs in rows]).to(device)


def _log_decay(kind: str, h: int) -> torch.Tensor:
    if kind == "none":
        return torch.zeros(h)
    # Strong to weak: lambda^16 ranges from ~1e-7 to ~0.85.
    return torch.linspace(-1.0, -0.01, h)


def _run(fn: Callable[..., Outputs], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         w_o: torch.Tensor, w_state: torch.Tensor) -> list[torch.Tensor]:
    """[o, state, dq, dk, dv] of fn, the gradients of sum(o * w_o) + sum(state * w_state)."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o, state = fn(*leaves)
    ((o.double() * w_o).sum() + (state.double() * w_state).sum()).backward()
    return [o.detach(), state.detach()] + [x.grad for x in leaves]


def _compare(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict[str, float]:
    names = ("o", "state", "dq", "dk", "dv")
    return {name: rel_err(a, b) for name, a, b in zip(names, got, want)}


# Block 8, T 37: documents start mid-block, exactly at block boundaries (8, 16, 32) and a
# length-1 document (at 8); the final state comes from a document that starts mid-block
# (row 0) or at a boundary spanning two blocks (row 1). Row 1 repeats id 5 after id 6: a
# new document, as in the recurrence.
_BLOCKED_DOCS = [[(0, 8), (1, 1), (2, 13), (3, 9), (4, 6)],
                 [(5, 16), (6, 5), (5, 11), (7, 5)]]


@pytest.mark.parametrize("block_size", [8, None])
@pytest.mark.parametrize("decay", ["none", "per_head"])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blocked_torch_matches_recurrence(dtype: torch.dtype, docs: bool, decay: str,
                                          block_size: Optional[int]) -> None:
    """Blocked PyTorch path (block 8, and the default 64 > T) vs the serial recurrence."""
    flags = (dtype == torch.float32, docs, decay == "per_head", block_size is None)
    gen = torch.Generator().manual_seed(sum(int(f) << i for i, f in enumerate(flags)))
    b, t, h, dk, dv = 2, 37, 3, 5, 7
    q, k = (torch.randn(b, t, h, dk, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(b, t, h, dv, generator=gen, dtype=dtype)
    w_o = torch.randn(b, t, h, dv, generator=gen, dtype=torch.float64)
    w_state = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    log_decay = _log_decay(decay, h)
    doc_ids = _docs(_BLOCKED_DOCS, device=q.device) if docs else None

    got = _run(lambda *x: lightning_attention_torch(*x, log_decay, doc_ids,
                                                    block_size=block_size),
               q, k, v, w_o, w_state)
    want = _run(lambda *x: lightning_attention_naive(*x, log_decay, doc_ids),
                q.double(), k.double(), v.double(), w_o, w_state)
    assert got[0].dtype == dtype and got[1].dtype == (torch.float64 if dtype == torch.float64
                                                      else torch.float32)
    errors = _compare(got, want)
    bad, err = worst(errors)
    assert err <= FP32_RTOL, f"{bad} rel err {err:.2e} (all: {errors})"


def test_auto_backend_on_cpu_is_torch_path() -> None:
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 20, 2, 4, generator=gen) for _ in range(3))
    log_decay = torch.tensor([0.0, -0.3])
    o, state = lightning_attention(q, k, v, log_decay, block_size=8)
    o_t, state_t = lightning_attention_torch(q, k, v, log_decay, block_size=8)
    assert torch.equal(o, o_t) and torch.equal(state, state_t)


# Triton cases: small enough for the interpreter, blocks of 16, T not a multiple of 16.
TRITON_CASES: dict[str, dict[str, Any]] = {
    # Docs start mid-block, at the boundaries 16 and 48, and one has length 1 (at 16).
    "docs_decay": dict(B=2, T=75, H=2, Dk=16, Dv=16, decay="per_head",
                       docs=[[(0, 16), (1, 1), (2, 20), (3, 11), (4, 27)],
                             [(5, 30), (6, 18), (7, 27)]]),
    "no_docs_no_decay": dict(B=1, T=40, H=2, Dk=16, Dv=32, decay="none", docs=None),
    # Column slices: the forward and dv scans split Dv, the dq and dk scans split Dk, over
    # two programs each.
    "docs_split_columns": dict(B=1, T=50, H=2, Dk=32, Dv=32, decay="per_head",
                               docs=[[(0, 3), (1, 32), (2, 15)]], block_dv=16, block_dk=16),
}


def _triton_inputs(case: dict[str, Any], seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    b, t, h, dk, dv = case["B"], case["T"], case["H"], case["Dk"], case["Dv"]
    q, k = (torch.randn(b, t, h, dk, generator=gen) for _ in range(2))
    v = torch.randn(b, t, h, dv, generator=gen)
    w_o = torch.randn(b, t, h, dv, generator=gen, dtype=torch.float64)
    w_state = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    return tuple(x.to(DEVICE) for x in (q, k, v, w_o, w_state))


@needs_triton
@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_matches_recurrence(name: str) -> None:
    """Autograd through the Triton kernels (forced, float32); the launchers with column
    slices; and the backward without a state gradient (the HAS_DSTATE=False path)."""
    case = TRITON_CASES[name]
    q, k, v, w_o, w_state = _triton_inputs(case, sorted(TRITON_CASES).index(name))
    log_decay = _log_decay(case["decay"], case["H"]).to(DEVICE)
    doc_ids = _docs(case["docs"], device=DEVICE) if case["docs"] else None
    naive = lambda *x: lightning_attention_naive(*x, log_decay, doc_ids)  # noqa: E731

    got = _run(lambda *x: lightning_attention(*x, log_decay, doc_ids, block_size=16,
                                              backend="triton"), q, k, v, w_o, w_state)
    want = _run(naive, q.double(), k.double(), v.double(), w_o, w_state)
    errors = {f"autograd {n}": e for n, e in _compare(got, want).items()}

    seg = None
    if doc_ids is not None:
        seg = torch.cat([torch.zeros_like(doc_ids[:, :1]),
                         (doc_ids[:, 1:] != doc_ids[:, :-1]).long()], 1).cumsum(1).int()
    blocks = dict(block_size=16)
    o, state = lightning_forward(q, k, v, log_decay, seg, **blocks,
                                 block_dv=case.get("block_dv"))
    grads = lightning_backward(w_o.float(), w_state.float(), q, k, v, log_decay, seg,
                               **blocks, block_dk=case.get("block_dk"),
                               block_dv=case.get("block_dv"))
    errors.update({f"launch {n}": e for n, e in _compare([o, state, *grads], want).items()})

    grads = lightning_backward(w_o.float(), None, q, k, v, log_decay, seg, **blocks,
                               block_dk=case.get("block_dk"), block_dv=case.get("block_dv"))
    want = _run(naive, q.double(), k.double(), v.double(), w_o, torch.zeros_like(w_state))
    errors.update({f"no dstate {n}": e
                   for n, e in _compare([o, state, *grads], want).items() if n[0] == "d"})
    bad, err = worst(errors)
    assert err <= FP32_RTOL, f"{name}: {bad} rel err {err:.2e} (all: {errors})"


def test_bad_arguments_name_the_argument() -> None:
    q = torch.randn(1, 8, 2, 16)
    v = torch.randn(1, 8, 2, 32)
    ld = torch.zeros(2)
    cases = [
        ("q must be", dict(q=q[0])),
        (r"k \(1, 8, 3, 16\)", dict(k=torch.randn(1, 8, 3, 16))),
        (r"v \(1, 9, 2, 32\)", dict(v=torch.randn(1, 9, 2, 32))),
        ("dtypes", dict(v=v.double())),
        (r"log_decay .*\(3,\)", dict(log_decay=torch.zeros(3))),
        ("log_decay .*int64", dict(log_decay=torch.zeros(2, dtype=torch.int64))),
        ("log_decay must be <= 0", dict(log_decay=torch.tensor([0.0, 0.5]))),
        (r"doc_ids .*\(1, 7\)", dict(doc_ids=torch.zeros(1, 7, dtype=torch.int64))),
        ("doc_ids .*float32", dict(doc_ids=torch.zeros(1, 8))),
        ("block_size=0", dict(block_size=0)),
        ("backend='cuda'", dict(backend="cuda")),
    ]
    for match, change in cases:
        args = dict(q=q, k=q, v=v, log_decay=ld, doc_ids=None, block_size=None,
                    backend="torch") | change
        with pytest.raises(ValueError, match=match):
            lightning_attention(**args)
    # Launcher limits (checked before triton is imported).
    with pytest.raises(ValueError, match="Dk, Dv in"):
        x = torch.randn(1, 8, 2, 24)
        lightning_forward(x, x, x, ld, None)
    with pytest.raises(ValueError, match="block_size=24"):
        lightning_forward(q, q, v, ld, None, block_size=24)
    with pytest.raises(ValueError, match="block_dv=64"):
        lightning_forward(q, q, v, ld, None, block_dv=64)
    with pytest.raises(ValueError, match="dstate"):
        lightning_backward(v, torch.zeros(1, 2, 16, 16), q, q, v, ld, None)


def test_package_imports_without_triton() -> None:
    assert_runs_without_triton(
        "import longtrain_kernels.lightning_attn as m; assert not m.available(); "
        "x = torch.randn(1, 5, 1, 4); "
        "o, s = m.lightning_attention(x, x, x, torch.zeros(1)); print('ok')")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("docs", [False, True])
def test_bf16_default_blocks_on_gpu(docs: bool) -> None:
    """bf16 at a real size with the default blocks (auto backend), against float64."""
    gen = torch.Generator().manual_seed(3)
    b, t, h, d = 2, 1000, 4, 64
    q, k, v = (0.1 * torch.randn(b, t, h, d, generator=gen) for _ in range(3))
    w_o = torch.randn(b, t, h, d, generator=gen, dtype=torch.float64).to(DEVICE)
    w_state = torch.randn(b, h, d, d, generator=gen, dtype=torch.float64).to(DEVICE)
    q, k, v = (x.to(DEVICE, torch.bfloat16) for x in (q, k, v))
    log_decay = torch.linspace(-0.5, -0.001, h).to(DEVICE)
    doc_ids = _docs([[(0, 300), (1, 411), (2, 289)]] * b, device=DEVICE) if docs else None
    got = _run(lambda *x: lightning_attention(*x, log_decay, doc_ids), q, k, v, w_o, w_state)
    want = _run(lambda *x: lightning_attention_naive(*x, log_decay, doc_ids),
                q.double(), k.double(), v.double(), w_o, w_state)
    errors = _compare(got, want)
    bad, err = worst(errors)
    assert err <= BF16_RTOL, f"{bad} rel err {err:.2e} (all: {errors})"
