"""The activation-memory model: each memory policy's per-rank bytes and relative step time
(`memory=auto`, which picks among them, is longtrain.planning.memory); and the model state
per rank under each sharding level (`static_bytes`, whose docstring has its table).

Legend (per TP rank): H hidden, q = local query heads x D, kv = local kv heads x D, I the
local intermediate size, V the local vocabulary shard, e the activation element size (4 fp32,
2 bf16), c = 1 + 4 / group_size the bytes per element stored int8 (one float32 scale per
group). Tokens per rank = micro_batch x seq_len / cp.

Saved for the backward per token and softmax layer (what `ActivationStore` counts):

| tensor | none | int8 | selective | full |
|---|---|---|---|---|
| attention-norm input x, qkv input | 2H e | 2H c | 2H e | x only: H e |
| fused qkv output (v is a view of it) | (q + 2kv) e | v: kv c | (q + 2kv) e | - |
| rotated q, k | (q + kv) e | (q + kv) c | (q + kv) e | - |
| attention output, out-projection input | q e | 2q c | q e | - |
| log-sum-exp | 4 x heads | 4 x heads | - | - |
| MLP-norm input, gate|up input | 2H e | 2H c | 2H e | - |
| gate|up output (SwiGLU's inputs) | 2I e | 2I c | 2I e | - |
| SwiGLU product (down-projection input) | I e | I c | - | - |
| RMSNorm rstd (2) | 8 | 8 | 8 | - |

A linear-attention layer saves its gate input and output instead of the log-sum-exp (about
2q more). Under sequence parallelism (`parallel.sequence_parallel`) the H terms (the norms'
and the column-parallel linears' inputs, the layer input under `full`) hold tokens / tp.
Outside the layers: the final norm and head inputs (2H, int8 too) and the logits with their
float32 copy for the loss ((e + 4) V; e V in fp32, where the loss works on the logits
themselves), for one chunk of `train.loss_chunk` positions at a time.

The peak comes in the backward, above what is saved, by a working set measured in units of
one layer's `none` column (L1): the backward of a layer holds activation gradients and
intermediates (BACKWARD_LAYERS x L1), `full` recomputes one whole layer (+1 L1), and int8
dequantizes a layer's saved tensors as its ops run backward (+INT8_DEQUANT_LAYERS x L1).
These constants were fitted to the measured peaks of benchmarks/memory.py (T 2K-8K, CP 1 and
2) and rounded up: the modelled peak is above every measured one there, by 0-15% at 8K
tokens and by up to 27% at 2K. The attention
backends' own transients (a ring step's K/V in flight, a block of scores) are part of that
working set.

Step-time cost of a policy, relative to none: recomputation from FLOPs (selective adds the
attention forward, full the whole forward) over 3x the forward, int8 a measured few per cent
(benchmarks/memory.py); offload costs nothing modelled here (it overlaps on GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from longtrain.attention.plan import plan_layers
from longtrain.config.schedule import stage_config, stages
from longtrain.parallel.dims import ParallelDims

GIB = float(1 << 30)
# int8 storage's step-time overhead (quantize at save, dequantize at use): +3% to +11% in
# benchmarks/memory.py on CPU; used only to rank policies
INT8_OVERHEAD = 0.06
# the backward's working set above the saved tensors, in layers of `none` activations (see
# the module docstring)
BACKWARD_LAYERS = 1.0
INT8_DEQUANT_LAYERS = 0.5


@dataclass(frozen=True)
class Policy:
    activations: str = "none"
    checkpointing: str = "none"
    offload: bool = False

    @property
    def name(self) -> str:
        parts = [p for p in (self.activations if self.activations != "none" else "",
                             self.checkpointing if self.checkpointing != "none" else "",
                             "offload" if self.offload else "") if p]
        return "+".join(parts) or "none"


CANDIDATES = [Policy(a, c, o) for o in (False, True) for c in ("none", "selective", "full")
              for a in ("none", "int8")]


@dataclass(frozen=True)
class Shape:
    """The per-rank sizes the model needs (see the legend)."""

    hidden: int
    q: int
    kv: int
    heads: int
    inter: int
    vocab: int
    layers: int
    linear_layers: int
    elem: int
    group_size: int
    tokens: int  # per rank per micro-batch
    seq_len: int
    # positions of the micro-batch whose logits exist at once (train.loss_chunk)
    loss_tokens: int
    params: int  # on this rank
    param_elem: int
    # Megatron sequence parallelism: the norms' and the column-parallel linears' inputs hold
    # tokens / tp (1: off)
    sp: int = 1
    # bytes per gradient element: the parameters' dtype, or 4 where the gradients are summed
    # over CP x DP in fp32 (optim.grad_reduce_dtype=fp32: buckets without ZeRO, FSDP's
    # reduce-scatter under ZeRO-3)
    grad_elem: int = 4
    # the embedding, final norm and LM head on this rank (the rest of `params` is the layers')
    root_params: int = 0

    @property
    def largest_layer_params(self) -> int:
        """The parameters of this rank's largest decoder layer (a linear-attention layer has
        its gate's)."""
        return layer_params(self.hidden, self.q, self.kv, self.inter,
                            linear=self.linear_layers > 0)

    @classmethod
    def of(cls, cfg: Any, *, seq_len: Optional[int] = None) -> "Shape":
        m, tp, cp = cfg.model, cfg.parallel.tp, cfg.parallel.cp
        d = m.head_dim or m.hidden_size // m.num_heads
        t = seq_len or cfg.data.seq_len
        elem = 2 if cfg.train.precision == "bf16" else 4
        vocab = -(-m.vocab_size // tp)
        q, kv, inter = m.num_heads * d // tp, m.num_kv_heads * d // tp, m.intermediate_size // tp
        n_linear = sum(layer.kind == "linear" for layer in plan_layers(cfg.attention, m))
        # the embedding, the final norm and the LM head (FSDP's root unit under optim.zero=3)
        root = vocab * m.hidden_size * (1 if m.tie_embeddings else 2) + m.hidden_size
        params = ((m.num_layers - n_linear) * layer_params(m.hidden_size, q, kv, inter)
                  + n_linear * layer_params(m.hidden_size, q, kv, inter, linear=True) + root)
        return cls(hidden=m.hidden_size, q=q, kv=kv, heads=m.num_heads // tp, inter=inter,
                   vocab=vocab, layers=m.num_layers, linear_layers=n_linear, elem=elem,
                   group_size=cfg.memory.group_size,
                   tokens=cfg.data.micro_batch_size * t // cp, seq_len=t, params=params,
                   root_params=root,
                   loss_tokens=cfg.data.micro_batch_size * min(
                       t // cp, cfg.train.loss_chunk or t // cp),
                   param_elem=elem,
                   sp=tp if getattr(cfg, "sequence_parallel", False) else 1,
                   grad_elem=_grad_elem(cfg, elem))


def layer_params(hidden: int, q: int, kv: int, inter: int, *, linear: bool = False) -> int:
    """One decoder layer's parameters on a TP rank: the q/k/v and out projections, the SwiGLU
    MLP, two RMSNorm weights, and a linear-attention layer's output gate (hidden x q)."""
    return (hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter + 2 * hidden
            + (hidden * q if linear else 0))


def _grad_elem(cfg: Any, elem: int) -> int:
    optim = getattr(cfg, "optim", None)
    if optim is None or optim.zero in (1, 2):
        return elem
    if optim.zero == 3:
        # FSDP reduce-scatters in optim.grad_reduce_dtype whatever the group size
        return 4 if optim.grad_reduce_dtype == "fp32" else elem
    dims = ParallelDims.from_config(cfg.parallel)
    summed = not dims.problems() and dims.cp * dims.dp > 1
    return 4 if summed and optim.grad_reduce_dtype == "fp32" else elem


def layer_bytes_per_token(s: Shape, policy: Policy, *, linear: bool = False) -> float:
    """Saved bytes per token of one decoder layer under `policy` (the table above)."""
    h, q, kv, i = s.hidden, s.q, s.kv, s.inter
    # the sequence-sharded inputs (norms, column-parallel linears) under sequence parallelism
    h = h / s.sp
    if policy.checkpointing == "full":
        return h * (1.0 + 4.0 / s.group_size if policy.activations == "int8" else s.elem)
    selective = policy.checkpointing == "selective"
    extra = 2 * q if linear else 0  # linear attention's gate input and output
    lse = 0 if linear or selective else 4 * s.heads
    product = 0 if selective else i
    if policy.activations == "int8":
        c = 1.0 + 4.0 / s.group_size
        # the attention's own output copy and the out-projection input: 2q (one when the
        # core attention is recomputed)
        out = q if selective else 2 * q
        return c * (4 * h + kv + (q + kv) + out + 2 * i + product + extra) + lse + 8
    return s.elem * (4 * h + (q + 2 * kv) + (q + kv) + q + 2 * i + product + extra) + lse + 8


def activation_bytes(s: Shape, policy: Policy) -> dict[str, float]:
    """Bytes per rank for one micro-batch in flight: 'layers' (saved by the decoder layers),
    'transient' (the backward's working set), 'final' (the final norm and head inputs),
    'logits' (one loss chunk's logits and, in bf16, their float32 copy: `train.loss_chunk`)
    and their 'total'."""
    softmax = s.layers - s.linear_layers
    per_token = (softmax * layer_bytes_per_token(s, policy)
                 + s.linear_layers * layer_bytes_per_token(s, policy, linear=True))
    one_layer = layer_bytes_per_token(s, Policy("none", "none"),
                                      linear=s.linear_layers == s.layers)
    transient = BACKWARD_LAYERS * one_layer
    if policy.checkpointing == "full":
        transient += one_layer
    elif policy.activations == "int8":
        transient += INT8_DEQUANT_LAYERS * one_layer
    stored = 1.0 + 4.0 / s.group_size if policy.activations == "int8" else s.elem
    out = {"layers": per_token * s.tokens, "transient": transient * s.tokens,
           "final": ((1 + 1 / s.sp) * s.hidden * stored + 4) * s.tokens,
           # the head's output, and its float32 copy unless it is float32 already
           "logits": (s.elem + (4 if s.elem != 4 else 0)) * s.vocab * s.loss_tokens}
    out["total"] = sum(out.values())
    return out


def static_bytes(s: Shape, *, zero: int = 0, shards: int = 1) -> dict[str, float]:
    """Model state per rank, by part: 'params', 'grads', 'optimizer', under optim.zero=3
    'gathered', and their 'total'. `shards` = N, the ranks the state is sharded over: the
    CP x DP group (cp * dp), for ZeRO-1/2 (DeepSpeed's data-parallel group) and ZeRO-3 alike.

    P = `s.params` (this TP rank's), e its element size (2 in bf16 runs, 4 in fp32), g the
    gradients' (`s.grad_elem`), m = 4 in bf16 runs (the fp32 master copy), 0 in fp32 (but
    always 4 under ZeRO-1/2: DeepSpeed keeps an fp32 partition of its own); R the
    root's parameters (embedding, final norm, LM head), Lx the largest decoder layer's:

    | part | zero 0 | zero 1 | zero 2 | zero 3 |
    |---|---|---|---|---|
    | params | e P | e P | e P | 4 P / N (fp32: the master weights) |
    | grads | g P | g P | g P / N | 4 P / N |
    | optimizer | (8 + m) P | (8 + m) P / N | (8 + m) P / N | 8 P / N (the AdamW moments) |
    | gathered | - | - | - | 2 e R + (2 e + g) Lx |

    Zero 3 (FSDP2, longtrain.train.fsdp) gathers the parameters per decoder layer just in
    time, in e: at most two layers at once (the current one and the prefetched next). The
    root is gathered for the whole step (FSDP2 does not reshard the root after the forward),
    and its gradients, in e, stay unsharded through the backward (the LM head's come first;
    the root reduce-scatters once, after the embedding's): 2 e R. One layer's gradients wait
    unsharded, in g, for their reduce-scatter."""
    p = s.params
    if zero == 3:
        out = {"params": 4 * p / shards, "grads": 4 * p / shards, "optimizer": 8 * p / shards,
               "gathered": (2 * s.param_elem * s.root_params
                            + (2 * s.param_elem + s.grad_elem) * s.largest_layer_params)}
        out["total"] = sum(out.values())
        return out
    optimizer = 8 * p + (4 * p if s.param_elem != 4 or zero in (1, 2) else 0)
    grads = s.grad_elem * p
    if zero >= 1:
        optimizer /= shards
    if zero >= 2:
        grads /= shards
    out = {"params": s.param_elem * p, "grads": grads, "optimizer": optimizer}
    out["total"] = sum(out.values())
    return out


def recompute_cost(s: Shape, policy: Policy) -> float:
    """Step time relative to `none` (see the module docstring)."""
    h, q, kv, i = s.hidden, s.q, s.kv, s.inter
    linear_flops = 2 * (h * (q + 2 * kv) + q * h + 3 * h * i)  # per token per layer
    attention_flops = 2 * s.seq_len * q  # causal: half of 4 T q
    forward = linear_flops + attention_flops
    extra = {"none": 0.0, "selective": attention_flops, "full": forward}[policy.checkpointing]
    cost = 1.0 + extra / (3 * forward)
    return cost + (INT8_OVERHEAD if policy.activations == "int8" else 0.0)


def device_budget_bytes(cfg: Any) -> float:
    """memory.budget_gib, or the device's memory (CPU: this machine's RAM over the ranks on it)."""
    if cfg.memory.budget_gib is not None:
        return cfg.memory.budget_gib * GIB
    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram / max(1, min(ParallelDims.from_config(cfg.parallel).world_size,
                            os.cpu_count() or 1))


@dataclass(frozen=True)
class Estimate:
    policy: Policy
    activations: float
    static: float
    cost: float
    # bytes offloaded to the host's memory per device (memory.offload: the saved activations)
    host: float = 0.0

    @property
    def total(self) -> float:
        return self.activations + self.static


def estimates(cfg: Any, *, on_gpu: bool) -> list[Estimate]:
    """Every candidate policy's per-rank memory and relative cost (offload only on GPU)."""
    # a progressive schedule: each stage's length and CP; the largest need counts
    shapes = [Shape.of(stage_config(cfg, st)) for st in stages(cfg)]
    dims = ParallelDims.from_config(cfg.parallel)
    static = static_bytes(shapes[0], zero=cfg.optim.zero, shards=dims.cp * dims.dp)["total"]
    out = []
    for policy in CANDIDATES:
        if policy.offload and not on_gpu:
            continue
        # offloaded: the saved tensors live on the host; the rest stays on the device
        acts = [activation_bytes(s, policy) for s in shapes]
        host = max(a["layers"] for a in acts) if policy.offload else 0.0
        need = max(a["total"] - (a["layers"] if policy.offload else 0.0) for a in acts)
        cost = max(recompute_cost(s, policy) for s in shapes)
        out.append(Estimate(policy, need, static, cost, host))
    return out


def configured_policy(cfg: Any, *, on_gpu: bool) -> Policy:
    """The policy `memory.*` configures (offload only counts on GPU)."""
    return Policy(cfg.memory.activations, cfg.memory.checkpointing,
                  cfg.memory.offload and on_gpu)


def estimate_bytes(cfg: Any, *, on_gpu: bool) -> float:
    """The configured memory policy's estimated peak per device, in bytes (a schedule's
    largest stage)."""
    policy = configured_policy(cfg, on_gpu=on_gpu)
    return next(e for e in estimates(cfg, on_gpu=on_gpu) if e.policy == policy).total
