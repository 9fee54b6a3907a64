"""Triton block flash attention vs torch SDPA (flash / cuDNN) on a GPU: fwd+bwd time, bf16.

    python -m benchmarks.flash_kernel --lengths 8192,16384,32768 [--out BENCHMARKS.md]

Both run causal attention on the same inputs, one after the other in one process; the table
gives the median of `--reps` timed repetitions after a warm-up and the ratio Triton / SDPA
(lower is better; the target is <= 1.3). Needs CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from benchmarks.report import replace_section


def _time_cuda(fn: Callable[[], None], *, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _causal_flops(b: int, h: int, t: int, d: int) -> float:
    # fwd 2 matmuls + bwd 5 matmuls of 2*T*T*D each, half of them under the causal mask
    return 7 * 2 * b * h * t * t * d / 2


def run(lengths: list[int], *, heads: int, kv_heads: int, head_dim: int, reps: int,
        sdpa_backend: str) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longtrain_kernels.flash_attn import flash_attention

    # default: no restriction, torch picks its kernel
    forced = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}

    rows = []
    for t in lengths:
        b = max(1, 32768 // t)
        gen = torch.Generator(device="cuda").manual_seed(t)
        mk = lambda h: torch.randn(b, t, h, head_dim, device="cuda", dtype=torch.bfloat16,  # noqa: E731
                                   generator=gen).requires_grad_()
        q, k, v = mk(heads), mk(kv_heads), mk(kv_heads)
        dout = torch.randn(b, t, heads, head_dim, device="cuda", dtype=torch.bfloat16)

        def triton_step() -> None:
            flash_attention(q, k, v, causal=True).backward(dout)

        def sdpa_step() -> None:
            choice = (sdpa_kernel([forced[sdpa_backend]]) if sdpa_backend in forced
                      else contextlib.nullcontext())
            with choice:
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                     v.transpose(1, 2), is_causal=True,
                                                     enable_gqa=heads != kv_heads)
            out.transpose(1, 2).backward(dout)

        t_tri = _time_cuda(triton_step, reps=reps)
        t_sdpa = _time_cuda(sdpa_step, reps=reps)
        flops = _causal_flops(b, heads, t, head_dim)
        rows.append({"length": t, "batch": b, "triton_s": t_tri, "sdpa_s": t_sdpa,
                     "ratio": t_tri / t_sdpa, "triton_tflops": flops / t_tri / 1e12,
                     "sdpa_tflops": flops / t_sdpa / 1e12})
    return rows


def render(rows: list[dict], *, device: str, heads: int, kv_heads: int, head_dim: int,
           sdpa_backend: str) -> str:
    lines = [
        f"Device: {device}; torch {torch.__version__}; causal, bf16, Hq={heads}, Hkv={kv_heads}, "
        f"D={head_dim}, batch x length = 32K tokens; fwd+bwd, median of timed repetitions; "
        f"SDPA backend: {sdpa_backend}.",
        "",
        "| length | batch | Triton fwd+bwd (ms) | SDPA fwd+bwd (ms) | Triton / SDPA | Triton TFLOP/s | SDPA TFLOP/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['length']} | {r['batch']} | {r['triton_s'] * 1e3:.2f} | "
                     f"{r['sdpa_s'] * 1e3:.2f} | {r['ratio']:.2f} | {r['triton_tflops']:.0f} | "
                     f"{r['sdpa_tflops']:.0f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,16384,32768")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--sdpa-backend", choices=["default", "flash", "cudnn"], default="default",
                        help="which SDPA kernel to compare against (default: torch's choice)")
    parser.add_argument("--out", default=None, help="BENCHMARKS.md to update")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.flash_kernel needs a CUDA device")
    rows = run([int(x) for x in args.lengths.split(",")], heads=args.heads,
               kv_heads=args.kv_heads, head_dim=args.head_dim, reps=args.reps,
               sdpa_backend=args.sdpa_backend)
    table = render(rows, device=torch.cuda.get_device_name(), heads=args.heads,
                   kv_heads=args.kv_heads, head_dim=args.head_dim, sdpa_backend=args.sdpa_backend)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.out:
        replace_section(args.out, "flash_kernel", "Triton flash attention vs torch SDPA (GPU)",
                        table)
    return rows


if __name__ == "__main__":
    main()
