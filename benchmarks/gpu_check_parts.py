"""The GPU work of `benchmarks.gpu_check`, one function per part: `(rows, deadline)`, writing
one row per case as it finishes and skipping (with a row that says so) the cases its
`deadline` can no longer hold. Needs CUDA; run through `python -m benchmarks.gpu_check`.

Models are built from configs with random weights: nothing is downloaded.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks.flash_kernel import _causal_flops, _time_cuda
from benchmarks.gpu_check import Deadline, RowWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(ROOT, "conf", "longtrain_conf", "model", "1b.yaml")
LENGTHS = (8192, 16384, 32768)
HEADS = ((32, 32), (32, 8))
HEAD_DIM = 128
# training steps: the first ones pay for allocation and compilation
WARMUP, TIMED = 2, 3
# seconds a case needs at least to be started (the part's process is killed at its budget)
NEEDS_S = {"attention": 6.0, "train_8k": 35.0, "train_32k": 60.0, "baseline": 45.0}


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1][:200] if text else ''}"


def _peak_tflops() -> float:
    from longtrain.observability.peaks import spec_peak

    found = spec_peak(torch.cuda.get_device_name(), torch.bfloat16)
    return found[0] if found else float("nan")


# ----------------------------------------------------------------------------- gpu tests

def part_gpu_tests(rows: RowWriter, deadline: Deadline) -> None:
    argv = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/", "-p",
            "no:cacheprovider"]
    try:
        res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                             timeout=max(deadline.left() - 5.0, 5.0))
    except subprocess.TimeoutExpired:
        rows.write({"rc": None, "summary": "timed out"})
        return
    lines = [x for x in res.stdout.splitlines() if x.strip()]
    rows.write({"rc": res.returncode, "summary": lines[-1] if lines else res.stderr[-300:]})


# ----------------------------------------------------------------------------- attention

def _sdpa(backend: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
          dout: torch.Tensor, *, gqa: bool) -> Callable[[], None]:
    from torch.nn.attention import sdpa_kernel

    def step() -> None:
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), is_causal=True,
                                                 enable_gqa=gqa)
        out.transpose(1, 2).backward(dout)

    return step


def _ours(flash_attention: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor,
          v: torch.Tensor, dout: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        flash_attention(q, k, v, causal=True).backward(dout)

    return step


def part_attention(rows: RowWriter, deadline: Deadline) -> None:
    from torch.nn.attention import SDPBackend

    from longtrain_kernels.flash_attn import flash_attention

    for t in LENGTHS:
        for hq, hkv in HEADS:
            case = {"t": t, "heads": hq, "kv_heads": hkv}
            impls = ("sdpa cuDNN", "sdpa flash", "ours (Triton)")
            if deadline.left() < NEEDS_S["attention"]:
                for impl in impls:
                    rows.skip({**case, "impl": impl}, "time budget")
                continue
            gen = torch.Generator(device="cuda").manual_seed(t + hkv)
            mk = lambda h: torch.randn(1, t, h, HEAD_DIM, device="cuda",  # noqa: E731
                                       dtype=torch.bfloat16, generator=gen).requires_grad_()
            q, k, v = mk(hq), mk(hkv), mk(hkv)
            dout = torch.randn(1, t, hq, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            # the backends that do not take GQA get K/V expanded outside the timed region
            kx = k.detach().repeat_interleave(hq // hkv, 2).requires_grad_()
            vx = v.detach().repeat_interleave(hq // hkv, 2).requires_grad_()
            steps = {
                "sdpa cuDNN": [_sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, dout, gqa=hq != hkv),
                               _sdpa(SDPBackend.CUDNN_ATTENTION, q, kx, vx, dout, gqa=False)],
                "sdpa flash": [_sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, dout, gqa=hq != hkv),
                               _sdpa(SDPBackend.FLASH_ATTENTION, q, kx, vx, dout, gqa=False)],
                "ours (Triton)": [_ours(flash_attention, q, k, v, dout)],
            }
            flops = _causal_flops(1, hq, t, HEAD_DIM)
            got: dict[str, float] = {}
            errors: dict[str, str] = {}
            for impl in impls:
                for i, fn in enumerate(steps[impl]):
                    try:
                        got[impl] = _time_cuda(fn, reps=5)
                        if i:
                            errors[impl + ":note"] = "K/V expanded"
                        break
                    except Exception as exc:  # noqa: BLE001 - reported as a row
                        errors[impl] = _reason(exc)
            base = got.get("sdpa cuDNN")
            for impl in impls:
                if impl not in got:
                    rows.write({**case, "impl": impl, "error": errors.get(impl, "not run")})
                    continue
                label = impl + (" (K/V expanded)" if impl + ":note" in errors else "")
                rows.write({**case, "impl": label, "seconds": got[impl],
                            "tflops": flops / got[impl] / 1e12,
                            "vs_cudnn": got[impl] / base if base else None})
            del q, k, v, kx, vx, dout, steps
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- training

def one_b_config(*, seq_len: int, compiled: bool, output_dir: str) -> Any:
    """The `1b` preset for one GPU: bf16, one sequence per step, no checkpoints."""
    import yaml

    from longtrain.config.schema import RunConfig
    from longtrain.planning.validate import validate

    cfg = RunConfig()
    with open(PRESET) as f:
        for key, value in yaml.safe_load(f).items():
            setattr(cfg.model, key, value)
    cfg.data.seq_len, cfg.data.batch_size, cfg.data.micro_batch_size = seq_len, 1, 1
    cfg.train.precision, cfg.train.compile = "bf16", compiled
    cfg.train.steps, cfg.train.save_hf = WARMUP + TIMED, False
    cfg.checkpoint.resume, cfg.checkpoint.every, cfg.checkpoint.save_final = "never", 0, False
    cfg.output_dir = output_dir
    validate(cfg)
    return cfg


def _train_worker(runtime: Any, cfg: Any, out_path: str) -> None:
    from longtrain.train.loop import train

    metrics = [{k: v for k, v in m.items()} for m in train(cfg, runtime)]
    if runtime.rank == 0:
        torch.save(metrics, out_path)


def part_train(rows: RowWriter, deadline: Deadline) -> None:
    from longtrain.parallel.spawn import run_distributed

    for t, compiled in ((32768, True), (32768, False), (8192, True), (8192, False)):
        case = {"model": "1b", "t": t, "compile": compiled}
        if deadline.left() < NEEDS_S["train_32k" if t > 8192 else "train_8k"]:
            rows.skip(case, "time budget")
            continue
        try:
            with tempfile.TemporaryDirectory(prefix="gpu-check-train-") as tmp:
                cfg = one_b_config(seq_len=t, compiled=compiled, output_dir=tmp)
                path = os.path.join(tmp, "metrics.pt")
                run_distributed(_train_worker, world_size=1, backend="nccl", args=(cfg, path),
                                timeout_s=int(max(deadline.left(), 30)))
                metrics = torch.load(path, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - reported as a row
            rows.write({**case, "error": _reason(exc)})
            continue
        timed = metrics[WARMUP:]
        med = lambda key: statistics.median(float(m[key]) for m in timed)  # noqa: E731
        rows.write({**case, "tokens_per_s": med("tokens_per_s"), "step_s": med("step_time_s"),
                    "mfu": med("mfu"), "mfu_vs_gemm": med("mfu_vs_gemm"),
                    "peak_tflops": med("peak_tflops"),
                    "mem_peak_gib": max(float(m["mem_peak_gib_max"]) for m in timed),
                    "mem_estimate_gib": float(timed[-1]["mem_estimate_gib"]),
                    "loss_last": float(metrics[-1]["loss"])})


# ----------------------------------------------------------------------------- baseline

class _PlainBlock(torch.nn.Module):
    """A Llama decoder layer in plain PyTorch (RMSNorm, RoPE, GQA SDPA, SwiGLU)."""

    def __init__(self, h: int, heads: int, kv_heads: int, d: int, inter: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, d
        self.n1, self.n2 = torch.nn.RMSNorm(h, eps=1e-5), torch.nn.RMSNorm(h, eps=1e-5)
        self.qkv = torch.nn.Linear(h, (heads + 2 * kv_heads) * d, bias=False)
        self.o = torch.nn.Linear(heads * d, h, bias=False)
        self.gate_up = torch.nn.Linear(h, 2 * inter, bias=False)
        self.down = torch.nn.Linear(inter, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).split(
            [self.heads * self.d, self.kv_heads * self.d, self.kv_heads * self.d], dim=-1)
        q, k, v = (y.view(b, t, -1, self.d).transpose(1, 2) for y in (q, k, v))

        def rope(y: torch.Tensor) -> torch.Tensor:
            y1, y2 = y.chunk(2, dim=-1)
            return y * cos + torch.cat([-y2, y1], dim=-1) * sin

        a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        gate, up = self.gate_up(self.n2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class PlainLlama(torch.nn.Module):
    """A Llama of the preset's shape in plain PyTorch, tied embeddings."""

    def __init__(self, m: Any) -> None:
        super().__init__()
        d = m.head_dim or m.hidden_size // m.num_heads
        self.d, self.theta = d, 500000.0
        self.embed = torch.nn.Embedding(m.vocab_size, m.hidden_size)
        self.layers = torch.nn.ModuleList(
            _PlainBlock(m.hidden_size, m.num_heads, m.num_kv_heads, d, m.intermediate_size)
            for _ in range(m.num_layers))
        self.norm = torch.nn.RMSNorm(m.hidden_size, eps=1e-5)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        inv = 1.0 / self.theta ** (torch.arange(0, self.d, 2, device=ids.device) / self.d)
        ang = torch.outer(torch.arange(t, device=ids.device, dtype=torch.float32), inv)
        cos, sin = (torch.cat([f(ang)] * 2, dim=-1).to(torch.bfloat16) for f in (torch.cos,
                                                                                  torch.sin))
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = F.linear(self.norm(x), self.embed.weight)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


def _baseline_model(m: Any) -> tuple[torch.nn.Module, str, Callable[..., torch.Tensor]]:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        model = PlainLlama(m)
        return model, "plain PyTorch Llama + SDPA + compile (no transformers)", \
            lambda ids: model(ids, ids)
    config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                         intermediate_size=m.intermediate_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                         num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim,
                         tie_word_embeddings=m.tie_embeddings, rope_theta=500000.0,
                         max_position_embeddings=m.max_position_embeddings,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    return model, "transformers LlamaForCausalLM + SDPA + compile", \
        lambda ids: model(input_ids=ids, labels=ids).loss


def part_baseline(rows: RowWriter, deadline: Deadline) -> None:
    from longtrain.model.flops import step_flops

    peak = _peak_tflops()
    for t in (32768, 8192):
        case = {"t": t, "impl": "baseline"}
        if deadline.left() < NEEDS_S["baseline"]:
            rows.skip(case, "time budget")
            continue
        try:
            cfg = one_b_config(seq_len=t, compiled=False, output_dir=tempfile.gettempdir())
            model, label, loss_of = _baseline_model(cfg.model)
            case["impl"] = label
            # fp32 weights and optimizer, bf16 autocast: the usual mixed-precision recipe
            model.to("cuda").train()
            compiled = torch.compile(loss_of)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
            ids = torch.randint(0, cfg.model.vocab_size, (1, t), device="cuda")
            torch.cuda.reset_peak_memory_stats()
            times = []
            for i in range(WARMUP + TIMED):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = compiled(ids)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                if i >= WARMUP:
                    times.append(time.perf_counter() - t0)
            step_s = statistics.median(times)
            flops = step_flops(cfg).total
            rows.write({**case, "tokens_per_s": t / step_s, "step_s": step_s,
                        "mfu": flops / step_s / 1e12 / peak,
                        "mem_peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30})
            del model, opt, compiled
        except Exception as exc:  # noqa: BLE001 - reported as a row
            rows.write({**case, "error": _reason(exc)})
        torch.cuda.empty_cache()


PART_FUNCTIONS: dict[str, Callable[[RowWriter, Deadline], None]] = {
    "gpu_tests": part_gpu_tests, "attention": part_attention, "train": part_train,
    "baseline": part_baseline,
}
