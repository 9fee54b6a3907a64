"""GPU check of the S2-Attention Triton kernels (entry point; CUDA only):

    python kernels/longtrain_kernels/s2_attn/gpu_check.py [--only errors|timing]

1. errors of `s2_attention(backend="triton")` against the float64 `s2_reference` (out, dq,
   dk, dv; max |a - b| / max |b|) in bf16 and fp32 at B=1, T=4096, Hq=16, Hkv=4, D=64 on the
   head slice 16..31 of a 32-head pattern (block 64, local 4, vert_stride 8, last 2 heads
   dense), with and without document ids;
2. fwd and fwd+bwd time (triton.testing.do_bench, median ms) against PyTorch's causal SDPA
   in bf16 at B=1, H=16, D=64, T = 8K, 16K, 32K, with the fraction of causal blocks the
   sparse pattern reads.

Legend: B batch, T sequence length, Hq / Hkv query and key/value heads, D head dim;
`q_bthd` [B, T, Hq, D] (the op's layout), `q_bhtd` [B, Hq, T, D] (SDPA's).
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from longtrain_kernels.s2_attn import S2Pattern, s2_attention, s2_reference

CHECK_PATTERN = S2Pattern(32, block_size=64, local_blocks=4, vert_stride=8, num_dense_heads=2)
CHECK_HEAD_OFFSET = 16
# Document lengths with boundaries inside blocks (sum 4096).
CHECK_DOCS = (1000, 1500, 1596)
TIME_LENGTHS = (8192, 16384, 32768)
TIME_HEADS = 16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| in float64; `b` is the reference."""
    a64, b64 = a.detach().double(), b.detach().double()
    return float((a64 - b64).abs().max() / b64.abs().max().clamp_min(1e-12))


def doc_ids(lengths: tuple[int, ...], *, device: torch.device) -> torch.Tensor:
    """[1, sum(lengths)] int64: document i repeated lengths[i] times."""
    return torch.cat([torch.full((n, ), i, dtype=torch.int64, device=device)
                      for i, n in enumerate(lengths)])[None]


def check_errors(dtype: torch.dtype, *, docs: Optional[tuple[int, ...]], t: int, hq: int,
                 hkv: int, d: int, pattern: S2Pattern, head_offset: int,
                 device: torch.device) -> dict[str, float]:
    """rel errors of out, dq, dk, dv against the float64 reference on the same rounded inputs."""
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = ((1, t, hq, d), (1, t, hkv, d), (1, t, hkv, d), (1, t, hq, d))
    q, k, v, dout = (torch.randn(s, generator=gen, device=device).to(dtype) for s in shapes)
    doc = None if docs is None else doc_ids(docs, device=device)
    opts = dict(head_offset=head_offset, q_doc=doc, k_doc=doc)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = s2_attention(*leaves, pattern, backend="triton", **opts)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref_out = s2_reference(*ref_leaves, pattern, **opts)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout.double())
    errors = {"out": rel_err(out, ref_out)}
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        errors[name] = rel_err(got, want)
    return errors


def block_fraction(pattern: S2Pattern, n_blocks: int) -> float:
    """Allowed (head, query block, key block) triples over the causal ones."""
    allowed = int(pattern.block_mask(n_blocks, n_blocks, range(pattern.num_heads)).sum())
    return allowed / (pattern.num_heads * n_blocks * (n_blocks + 1) // 2)


def _fwd_bwd(fn: Callable[..., torch.Tensor], leaves: list[torch.Tensor],
             dout: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        torch.autograd.grad(fn(*leaves), leaves, dout)
    return step


def _fwd(fn: Callable[..., torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            fn(*leaves)
    return step


def time_vs_sdpa(t: int, *, heads: int, d: int, pattern: S2Pattern,
                 device: torch.device) -> dict[str, float]:
    """Median ms of s2 and causal SDPA, fwd and fwd+bwd, bf16, each in its native layout."""
    from triton.testing import do_bench

    gen = torch.Generator(device=device).manual_seed(1)

    def rand(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device).to(torch.bfloat16)

    s2_leaves = [rand((1, t, heads, d)).requires_grad_() for _ in range(3)]
    sdpa_leaves = [rand((1, heads, t, d)).requires_grad_() for _ in range(3)]
    s2_dout, sdpa_dout = rand((1, t, heads, d)), rand((1, heads, t, d))

    def s2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return s2_attention(q, k, v, pattern, backend="triton")

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return {
        "s2 fwd": do_bench(_fwd(s2, s2_leaves)),
        "sdpa fwd": do_bench(_fwd(sdpa, sdpa_leaves)),
        "s2 fwd+bwd": do_bench(_fwd_bwd(s2, s2_leaves, s2_dout)),
        "sdpa fwd+bwd": do_bench(_fwd_bwd(sdpa, sdpa_leaves, sdpa_dout)),
    }


def sdpa_backend(*, heads: int, d: int, device: torch.device) -> str:
    """The aten ops one causal SDPA fwd+bwd dispatches to (which backend torch takes)."""
    x = [torch.randn(1, heads, 1024, d, device=device, dtype=torch.bfloat16,
                     requires_grad=True) for _ in range(3)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                acc_events=True) as prof:
        out = F.scaled_dot_product_attention(*x, is_causal=True)
        out.backward(torch.ones_like(out))
    names = {e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")}
    return ", ".join(sorted(names))


def print_errors(device: torch.device) -> None:
    print(f"\nerrors vs float64 reference: T=4096 Hq=16 Hkv=4 D=64, {CHECK_PATTERN}, "
          f"head_offset={CHECK_HEAD_OFFSET}")
    print(f"{'dtype':>9} {'docs':>5} {'out':>9} {'dq':>9} {'dk':>9} {'dv':>9}")
    for dtype in (torch.bfloat16, torch.float32):
        for docs in (None, CHECK_DOCS):
            errors = check_errors(dtype, docs=docs, t=4096, hq=16, hkv=4, d=64,
                                  pattern=CHECK_PATTERN, head_offset=CHECK_HEAD_OFFSET,
                                  device=device)
            row = " ".join(f"{errors[k]:9.2e}" for k in ("out", "dq", "dk", "dv"))
            print(f"{str(dtype).split('.')[-1]:>9} {docs is not None!s:>5} {row}")
            torch.cuda.empty_cache()


def print_timings(device: torch.device) -> None:
    pattern = S2Pattern(TIME_HEADS, block_size=64, local_blocks=4, vert_stride=8)
    print(f"\ntime (ms, median) vs causal SDPA: bf16 B=1 H={TIME_HEADS} D=64, {pattern}")
    print("SDPA ops: " + sdpa_backend(heads=TIME_HEADS, d=64, device=device))
    print(f"{'T':>6} {'blocks':>7} {'s2 fwd':>8} {'sdpa fwd':>9} {'ratio':>6} "
          f"{'s2 f+b':>8} {'sdpa f+b':>9} {'ratio':>6}")
    for t in TIME_LENGTHS:
        ms = time_vs_sdpa(t, heads=TIME_HEADS, d=64, pattern=pattern, device=device)
        frac = block_fraction(pattern, t // pattern.block_size)
        print(f"{t:>6} {frac:>7.3f} {ms['s2 fwd']:>8.3f} {ms['sdpa fwd']:>9.3f} "
              f"{ms['s2 fwd'] / ms['sdpa fwd']:>6.3f} {ms['s2 fwd+bwd']:>8.3f} "
              f"{ms['sdpa fwd+bwd']:>9.3f} {ms['s2 fwd+bwd'] / ms['sdpa fwd+bwd']:>6.3f}")
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("errors", "timing"), default=None,
                        help="run one of the two parts (default: both)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device")
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.only in (None, "errors"):
        print_errors(device)
    if args.only in (None, "timing"):
        print_timings(device)


if __name__ == "__main__":
    main()
