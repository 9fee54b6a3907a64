"""The scale table: what the planner picks, and what the cost model predicts, for Llama-shaped
8B and 70B models at 128K and 1M tokens on 64 and 512 H100s, beside two published figures;
prints the tables and writes a section of BENCHMARKS.md. Nothing here is measured: every
number of ours is a prediction.

    python -m benchmarks.scale_table [--out BENCHMARKS.md] [--json rows.json]

How each figure comes about is `METHOD` below, which also goes into BENCHMARKS.md with the
tables.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from benchmarks.report import (add_output_args, argument_parser, command_line, compose_config,
                               publish)

TITLE = "Scale table: the planner's layouts for 8B and 70B at 128K-1M tokens on 64-512 H100s"
PRESET = "h100-8x8-ib400"
# Llama-3.1-8B and Llama-3-70B shapes, as overrides of the `8b` model preset
MODELS = {
    "8B": ("model.hidden_size=4096", "model.num_layers=32", "model.num_heads=32",
           "model.num_kv_heads=8", "model.intermediate_size=14336"),
    "70B": ("model.hidden_size=8192", "model.num_layers=80", "model.num_heads=64",
            "model.num_kv_heads=8", "model.intermediate_size=28672"),
}
LENGTHS = (131072, 1048576)
GPUS = (64, 512)
# tokens per optimizer step (Llama 3 trained with 4M-16M)
BATCH_TOKENS = 2 ** 23

# published figures for the sanity rows
TORCHTITAN_TPS = 548.0
MEGATRON_MFU = 0.47

METHOD = f"""\
- **Predictions, not measurements.** No row here ran on an H100. The planner
  (`longtrain.planning.search.recommend`) searches every tp within a node, every cp and CP
  backend that `longtrain.planning.validate` accepts, under every memory policy (int8
  activations, selective or full recomputation, offload) whose estimate
  (`longtrain.memory.estimate`) fits 80 GiB (offloading: and whose saved activations fit the
  host, 3/4 of 2 TB per node of 8, 192 GiB per GPU), at the configured `optim.zero=0`, and,
  for a layout where none fits, fully sharded over CP x DP (`optim.zero=3`); it ranks them
  by the cost model (`longtrain.planning.costmodel`, whose docstring has the equations) and
  the fastest is shown. The preset `{PRESET}` (989 dense bf16 TFLOP/s, GEMMs at 60% and
  attention at 45% of it, NVLink 450 GB/s inside a node of 8, one 400 Gb/s NIC per GPU) is
  scaled to the node count. Its bandwidths are specification values, so communication is a
  lower bound and the step time an optimistic estimate.
- **Workload**: bf16, {BATCH_TOKENS // 2 ** 20}M tokens per optimizer step (the global batch
  in sequences is that over the sequence length), micro-batch 1, the loss in 4096-token
  chunks (`train.loss_chunk`); tokens/s per GPU = the step's tokens / step time / GPUs;
  MFU = the model FLOPs (`longtrain.model.flops`, causal attention counted once) / step
  time / (GPUs x 989 TFLOP/s).
- **Memory**: per GPU, the model state (`static_bytes`: parameters, gradients and AdamW
  state, sharded as the zero level says, and under zero 3 the gathered working set of the
  root and two layers) plus the policy's activations; host GiB: the saved activations an
  offloading policy keeps in host memory. Offloading is predicted to cost nothing where the
  host link (PCIe, 50 GB/s) moves the saved activations out within the forward's compute
  time and back within the backward's, which at these lengths it does: the part of these
  rows least backed by a measurement. "No layout fits" would give the smallest estimate of
  any valid layout and policy (`search.smallest_need`).
- **Sanity rows**: a published figure, the setting it was measured in, and our prediction
  for the closest setting this model describes. torchtitan (docs/performance.md, Table 2):
  Llama 3.1 8B, 262144 tokens, 8 H100s as FSDP 1 x CP 8 (its FSDP shards over CP, so here
  `optim.zero=3`, tp 1, cp 8, ring), local batch 1, full activation checkpointing,
  torch.compile and Float8 GEMMs, 96 GB H100s at a 500 W power limit: {TORCHTITAN_TPS:.0f}
  tokens/s per GPU. Megatron-LM (README): up to {MEGATRON_MFU:.0%} MFU on H100 for GPT
  models of 2B to 462B parameters at short sequences, with TP, PP and its distributed
  optimizer; ours: the planner's pick for the 70B shape at 4096 tokens on 64 H100s starting
  from `optim.zero=1` (the distributed optimizer's sharding; no pipeline parallelism here).
  The ratio is ours over theirs. The settings differ as said, so it checks the model's
  efficiencies for plausibility; it validates nothing.
"""


@dataclass
class Row:
    model: str
    seq_len: int
    gpus: int
    batch: int
    layout: str = ""
    zero: int = 0
    memory_policy: str = ""
    memory_gib: float = 0.0
    host_gib: float = 0.0
    step_s: float = 0.0
    tokens_per_gpu_s: float = 0.0
    mfu: float = 0.0
    comm_s: dict[str, float] = field(default_factory=dict)
    overrides: str = ""
    # where no layout fits: the smallest need and the layout that has it
    need_gib: Optional[float] = None
    need: str = ""


def base_config(model: str, seq_len: int, gpus: int, batch: int, *,
                extra: tuple[str, ...] = ()) -> Any:
    """The run config the search starts from: tp 8 x cp (the rest) x dp 1, ring, on the
    preset scaled to `gpus`."""
    nodes = max(1, gpus // 8)
    return compose_config([
        "model=8b", *MODELS[model], "model.max_position_embeddings=131072",
        f"data.seq_len={seq_len}", f"data.batch_size={batch}", "data.micro_batch_size=1",
        "train.precision=bf16", f"parallel.world_size={gpus}", f"parallel.tp={min(8, gpus)}",
        f"parallel.cp={max(1, gpus // 8)}", "attention=ring",
        f"cluster={PRESET if gpus > 8 else 'h100-1x8'}",
        *([f"cluster.nodes={nodes}"] if gpus > 8 else []), "output_dir=/tmp", *extra])


def _cluster(cfg: Any) -> Any:
    from longtrain.planning.cluster import cluster_from_config

    return cluster_from_config(cfg)


def _row(model: str, seq_len: int, gpus: int, batch: int, pred: Any) -> Row:
    return Row(model, seq_len, gpus, batch, pred.layout, pred.zero, pred.memory_policy,
               pred.memory_gib or 0.0, pred.host_gib or 0.0, pred.step_s,
               pred.tokens_per_s / gpus, pred.mfu, dict(pred.comm_s), pred.overrides)


def planned_row(model: str, seq_len: int, gpus: int, *, extra: tuple[str, ...] = ()) -> Row:
    """The planner's fastest layout for the workload, or the smallest need where none fits."""
    from longtrain.planning.search import recommend, smallest_need

    batch = max(1, BATCH_TOKENS // seq_len)
    cfg = base_config(model, seq_len, gpus, batch, extra=extra)
    cluster = _cluster(cfg)
    best = recommend(cfg, cluster, top=1)
    if best:
        return _row(model, seq_len, gpus, batch, best[0])
    need = smallest_need(cfg, cluster)
    return Row(model, seq_len, gpus, batch, need_gib=need[0] if need else None,
               need=need[1] if need else "no valid layout")


def torchtitan_row() -> Row:
    """Our prediction for torchtitan's Table 2 setting (see METHOD)."""
    from longtrain.memory.estimate import GIB, estimates
    from longtrain.planning.costmodel import predict

    cfg = base_config("8B", 262144, 8, 1, extra=("memory.checkpointing=full",))
    cfg = copy.deepcopy(cfg)
    cfg.parallel.tp, cfg.parallel.cp, cfg.optim.zero = 1, 8, 3
    cluster = _cluster(cfg)
    pred = predict(cfg, cluster)
    pred.memory_gib = next(e.total for e in estimates(cfg, on_gpu=True)
                           if e.policy.name == "full") / GIB
    return _row("8B", 262144, 8, 1, pred)


def _length(tokens: int) -> str:
    return f"{tokens // 2 ** 20}M" if tokens % 2 ** 20 == 0 else f"{tokens // 1024}K"


def _gib(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}"


def scale_table(rows: list[Row]) -> str:
    lines = ["| model | tokens / seq | GPUs | batch (seqs) | layout (planner's pick) | zero | "
             "memory policy | GiB / GPU | host GiB / GPU | step s | tokens/s / GPU | MFU | "
             "exposed comm s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r.model} | {_length(r.seq_len)} | {r.gpus} | {r.batch} |"
        if r.need_gib is not None or not r.layout:
            lines.append(f"{head} **no layout fits** (smallest need: {_gib(r.need_gib)} GiB, "
                         f"`{r.need}`) | - | - | - | - | - | - | - | - |")
            continue
        comm = ", ".join(f"{k} {v:.2f}" for k, v in r.comm_s.items() if v >= 0.005) or "-"
        lines.append(f"{head} {r.layout} | {r.zero} | {r.memory_policy} | "
                     f"{r.memory_gib:.1f} | {r.host_gib:.0f} | {r.step_s:.2f} | "
                     f"{r.tokens_per_gpu_s:,.0f} | {r.mfu:.1%} | {comm} |")
    return "\n".join(lines)


def sanity_table(titan: Row, megatron: Row) -> str:
    lines = ["| published | their setting | our prediction for | ours | ours / theirs |",
             "|---|---|---|---|---|",
             f"| torchtitan: {TORCHTITAN_TPS:.0f} tokens/s per GPU | Llama 3.1 8B, 256K, 8 H100, "
             f"FSDP 1 x CP 8, full AC, compile + Float8 | 8B, 256K, 8 H100, {titan.layout}, "
             f"zero {titan.zero}, {titan.memory_policy} ({titan.memory_gib:.1f} GiB) | "
             f"{titan.tokens_per_gpu_s:,.0f} tokens/s per GPU (MFU {titan.mfu:.1%}) | "
             f"{titan.tokens_per_gpu_s / TORCHTITAN_TPS:.2f} |"]
    if megatron.layout:
        lines.append(f"| Megatron-LM: {MEGATRON_MFU:.0%} MFU | GPT 2B-462B, short sequences, "
                     f"H100, TP + PP + distributed optimizer | 70B, 4K, 64 H100, "
                     f"{megatron.layout}, zero {megatron.zero}, {megatron.memory_policy} "
                     f"({megatron.memory_gib:.1f} GiB) | MFU {megatron.mfu:.1%} | "
                     f"{megatron.mfu / MEGATRON_MFU:.2f} |")
    else:
        lines.append(f"| Megatron-LM: {MEGATRON_MFU:.0%} MFU | GPT 2B-462B, short sequences, "
                     f"H100, TP + PP + distributed optimizer | 70B, 4K, 64 H100 | no layout "
                     f"fits (smallest need {_gib(megatron.need_gib)} GiB) | - |")
    return "\n".join(lines)


def caveat(titan: Row) -> str:
    """A note on reading the table, from the long-context sanity ratio."""
    ratio = titan.tokens_per_gpu_s / TORCHTITAN_TPS
    if ratio <= 1.15:
        return ""
    return (f"\n\nIn the long-context comparison the model predicts {ratio:.1f}x the published "
            f"throughput. Part of that is the setting (a 500 W power limit there), part the "
            f"model (attention at 45% of peak, no kernel gaps, specification bandwidths). Read "
            f"the absolute tokens/s and MFU above as upper bounds; the planner uses only their "
            f"order.")


def _direction(ours: float, theirs: float) -> str:
    """What a sanity ratio says about the model, within 15%."""
    if ours > 1.15 * theirs:
        return "the model is optimistic here"
    if ours < theirs / 1.15:
        return "the model is pessimistic here"
    return "within 15%"


def verdicts(rows: list[Row], titan: Row, megatron: Row) -> list[str]:
    out = []
    for r in rows:
        what = f"{r.model} at {_length(r.seq_len)} on {r.gpus} GPUs"
        if r.layout:
            out.append(f"{what}: {r.layout}, memory {r.memory_policy}, predicted "
                       f"{r.memory_gib:.0f} GiB, {r.tokens_per_gpu_s:,.0f} tokens/s per GPU, "
                       f"MFU {r.mfu:.0%}")
        else:
            out.append(f"{what}: no layout fits 80 GiB (smallest need "
                       f"{_gib(r.need_gib)} GiB)")
    out.append(f"sanity: torchtitan's setting predicted at {titan.tokens_per_gpu_s:,.0f} "
               f"tokens/s per GPU, {titan.tokens_per_gpu_s / TORCHTITAN_TPS:.2f}x its "
               f"published {TORCHTITAN_TPS:.0f} "
               f"({_direction(titan.tokens_per_gpu_s, TORCHTITAN_TPS)})")
    if megatron.layout:
        out.append(f"sanity: 70B at 4K predicted at {megatron.mfu:.0%} MFU, "
                   f"{megatron.mfu / MEGATRON_MFU:.2f}x Megatron-LM's {MEGATRON_MFU:.0%} "
                   f"({_direction(megatron.mfu, MEGATRON_MFU)})")
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argument_parser(__doc__, METHOD)
    add_output_args(p)
    args = p.parse_args(argv)
    rows = [planned_row(model, length, gpus) for model in MODELS for length in LENGTHS
            for gpus in GPUS]
    titan = torchtitan_row()
    megatron = planned_row("70B", 4096, 64, extra=("optim.zero=1",))
    parts = [f"Predicted (no hardware ran these) on `{PRESET}` scaled to the GPU count.",
             f"```\n{command_line('benchmarks.scale_table', argv)}\n```",
             scale_table(rows),
             "Sanity against published figures:\n\n" + sanity_table(titan, megatron)
             + caveat(titan)]
    lines = verdicts(rows, titan, megatron)
    result = {"rows": [asdict(r) for r in rows], "torchtitan": asdict(titan),
              "megatron": asdict(megatron)}
    publish(result, parts=parts, lines=lines, method=METHOD, key="scale_table", title=TITLE,
            out=args.out, json_path=args.json, shown=2)
    return result


if __name__ == "__main__":
    main()
