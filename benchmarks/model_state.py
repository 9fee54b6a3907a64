"""Model state per rank under each sharding level: the bytes of parameters, AdamW state and
everything else a rank keeps between steps, one training step's peak and one checkpoint
save's peak, and the step time, for worlds of 1, 2 and 4 ranks with no sharding, ZeRO-1,
ZeRO-2 and full sharding (optim.zero=3, FSDP2), and at TP=2 with and without sequence
parallelism; beside the planner's estimate of each. Prints the table and writes a section of
BENCHMARKS.md.

    python -m benchmarks.model_state [--quick] [--out BENCHMARKS.md] [--json rows.json]
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Optional

from benchmarks.report import add_output_args, argument_parser, command_line, publish

TITLE = "Model state per rank: sharding levels, sequence parallelism and checkpoint saves"
MIB = 2 ** 20

# (label, world, tp, zero, sequence parallelism); CP = 1, so CP x DP = world / tp
CASES = [
    ("world 1", 1, 1, 0, False),
    ("world 2, no sharding", 2, 1, 0, False),
    ("world 2, ZeRO-1", 2, 1, 1, False),
    ("world 2, ZeRO-2", 2, 1, 2, False),
    ("world 2, full (zero 3)", 2, 1, 3, False),
    ("world 4, no sharding", 4, 1, 0, False),
    ("world 4, ZeRO-1", 4, 1, 1, False),
    ("world 4, ZeRO-2", 4, 1, 2, False),
    ("world 4, full (zero 3)", 4, 1, 3, False),
    ("TP 2, no SP", 2, 2, 0, False),
    ("TP 2, SP", 2, 2, 0, True),
    ("TP 2 x DP 2, full + SP", 4, 2, 3, True),
]
QUICK = {"world 1", "world 2, ZeRO-1", "world 2, full (zero 3)", "TP 2, SP"}
# a model whose state dominates a rank's memory: ~50M parameters, 16 bytes each in fp32
MODEL = {"hidden_size": 768, "num_layers": 6, "num_heads": 12, "num_kv_heads": 4,
         "intermediate_size": 2048, "vocab_size": 32000}
SEQ_LEN, BATCH = 1024, 4

METHOD = f"""\
- Model: hidden {MODEL['hidden_size']}, {MODEL['num_layers']} layers, {MODEL['num_heads']}
  heads ({MODEL['num_kv_heads']} KV), intermediate {MODEL['intermediate_size']}, vocabulary
  {MODEL['vocab_size']} (untied): fp32, AdamW; {BATCH} sequences of {SEQ_LEN} tokens per step
  (the same global batch in every world: fewer micro-batches per rank as DP grows), dense
  attention, no recomputation. Each case is its own world of gloo processes on this
  machine's 2 cores (4 ranks oversubscribe them: the bytes hold, the times are shared).
- **params / optimizer**: bytes of this rank's parameters (FSDP: its shards; ZeRO: the full
  TP-local parameters DeepSpeed keeps), and of its AdamW state (the moments, plus the
  separate fp32 master partition under ZeRO), counted from the tensors themselves.
- **grads + other**: every other tensor alive when the third step's update starts, by a
  census of live tensor storages: the gradients (buckets, DeepSpeed's partitions, FSDP's
  sharded ones) and whatever buffers the engine keeps.
- **planner**: `longtrain.memory.estimate.static_bytes` for the same case: parameters +
  gradients + optimizer state, and separately under zero 3 the working set gathered during
  the step (the root for the whole step, two layers, one layer's unsharded gradients), which
  the census at the update does not see.
- **step peak / save peak**: the process's peak RSS during the second training step, and
  during a checkpoint save right after the third (the kernel's high-water mark reset just
  before each), and the save's peak over the step's. Rank 0 shown (the largest).
- **saved**: the activation bytes the last micro-batch's forward saved for the backward
  (the memory policy's store), where sequence parallelism matters.
- **step s**: the mean of steps 2 and 3.
"""


@dataclass
class Row:
    label: str
    world: int
    tp: int
    zero: int
    sp: bool
    params_mib: float
    optimizer_mib: float
    other_mib: float
    planner_mib: float
    gathered_mib: float
    step_peak_mib: float
    save_peak_mib: float
    saved_mib: float
    step_s: float


def _config(world: int, tp: int, zero: int, sp: bool, out: str) -> Any:
    from longtrain.config.schema import RunConfig

    cfg = RunConfig()
    cfg.parallel.world_size, cfg.parallel.tp = world, tp
    cfg.parallel.sequence_parallel = sp
    for key, value in MODEL.items():
        setattr(cfg.model, key, value)
    cfg.model.tie_embeddings = False
    cfg.data.seq_len, cfg.data.docs_per_seq = SEQ_LEN, 1
    cfg.data.batch_size, cfg.data.micro_batch_size = BATCH, 1
    cfg.train.steps, cfg.optim.zero = 3, zero
    cfg.output_dir = out
    cfg.checkpoint.every, cfg.checkpoint.save_final, cfg.checkpoint.resume = 0, False, "never"
    return cfg


def _tensor_bytes() -> dict[int, int]:
    """Every live tensor storage (by address) and its bytes, DTensors' local shards included."""
    import torch
    from torch.distributed.tensor import DTensor

    out: dict[int, int] = {}
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on lazy module objects warns
        for obj in gc.get_objects():
            try:
                if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                    continue
                t = obj.to_local() if isinstance(obj, DTensor) else obj
                storage = t.untyped_storage()
                out[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, ReferenceError, AttributeError):
                continue
    return out


def _held(holders: list[Any]) -> dict[int, int]:
    from longtrain.checkpoint.chunks import held_parts

    out: dict[int, int] = {}
    for held in holders:
        for _, t in held_parts(held):
            storage = t.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def _worker(runtime: Any, world: int, tp: int, zero: int, sp: bool, path: str) -> None:
    import torch
    import torch.distributed as dist

    from longtrain.observability.resources import reset_peak_rss, status_kib
    from longtrain.train.loop import TrainState, checkpoint_meta, train
    from longtrain.train.state import save_train_state

    with tempfile.TemporaryDirectory(prefix="longtrain-model-state-") as out:
        cfg = _config(world, tp, zero, sp, out)
        state = TrainState.create(cfg, runtime)
        steps = train(cfg, runtime, state=state)
        next(steps)
        reset_peak_rss()
        t0 = time.perf_counter()
        next(steps)
        step_peak = status_kib("VmHWM") * 1024.0
        # the census of step 3 is taken as its update starts: the gradients are complete
        census: dict[str, Any] = {}
        census_s = [0.0]
        update = state.optimizer.step

        def counted_step(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            census.update(_tensor_bytes())
            census_s[0] += time.perf_counter() - t
            return update(*args, **kwargs)

        state.optimizer.step = counted_step
        next(steps)
        # the census is not part of the step
        step_s = (time.perf_counter() - t0 - census_s[0]) / 2
        held = state.optimizer.held_state()
        params = _held([p.detach() for p in state.model.parameters()])
        moments = _held([h[k] for h in held for k in ("exp_avg", "exp_avg_sq")])
        masters = {k: v for k, v in _held([h["master"] for h in held]).items()
                   if k not in params}
        optimizer = {**moments, **masters}
        other = sum(v for k, v in census.items() if k not in params and k not in optimizer)
        saved = state.model.memory_policy.store.stats.raw_bytes
        reset_peak_rss()
        save_train_state(os.path.join(out, "checkpoints"), step=3, model=state.model,
                         optimizer=state.optimizer, runtime=state.runtime, keep=1,
                         meta=checkpoint_meta(cfg, step=3))
        save_peak = status_kib("VmHWM") * 1024.0
        row = torch.tensor([sum(params.values()), sum(optimizer.values()), other, step_peak,
                            save_peak, saved, step_s], dtype=torch.float64)
        rows = [torch.zeros_like(row) for _ in range(world)]
        dist.all_gather(rows, row)
        if runtime.rank == 0:
            with open(path, "w") as f:
                json.dump([r.tolist() for r in rows], f)


def planner_bytes(world: int, tp: int, zero: int, sp: bool) -> tuple[float, float]:
    """The planner's model state (parameters, gradients, optimizer state) and, under zero
    3, the working set FSDP gathers during the step."""
    from longtrain.memory.estimate import Shape, static_bytes

    cfg = _config(world, tp, zero, sp, "")
    parts = static_bytes(Shape.of(cfg), zero=zero, shards=world // tp)
    return parts["params"] + parts["grads"] + parts["optimizer"], parts.get("gathered", 0.0)


def measure(cases: list[tuple]) -> list[Row]:
    from longtrain.parallel.spawn import run_distributed

    rows = []
    for label, world, tp, zero, sp in cases:
        with tempfile.TemporaryDirectory(prefix="longtrain-bench-") as tmp:
            path = os.path.join(tmp, "rows.json")
            run_distributed(_worker, world_size=world, tp=tp, args=(world, tp, zero, sp, path),
                            timeout_s=1200)
            with open(path) as f:
                ranks = json.load(f)
        p, o, other, step_peak, save_peak, saved, step_s = ranks[0]
        planned, gathered = planner_bytes(world, tp, zero, sp)
        row = Row(label, world, tp, zero, sp, p / MIB, o / MIB, other / MIB, planned / MIB,
                  gathered / MIB, step_peak / MIB, save_peak / MIB, saved / MIB,
                  max(r[6] for r in ranks))
        print(f"{label}: params {row.params_mib:.0f} MiB, optimizer {row.optimizer_mib:.0f} "
              f"MiB, other {row.other_mib:.0f} MiB, step peak {row.step_peak_mib:.0f} MiB, "
              f"save peak {row.save_peak_mib:.0f} MiB, {row.step_s:.2f} s", flush=True)
        rows.append(row)
    return rows


def table(rows: list[Row]) -> str:
    head = ("| case | params MiB | optimizer MiB | grads + other MiB | state MiB (planner) | "
            "gathered MiB (planner) | step peak MiB | save peak MiB (x step) | saved MiB | "
            "step s |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        state = r.params_mib + r.optimizer_mib + r.other_mib
        lines.append(f"| {r.label} | {r.params_mib:,.0f} | {r.optimizer_mib:,.0f} | "
                     f"{r.other_mib:,.0f} | {state:,.0f} ({r.planner_mib:,.0f}) | "
                     f"{r.gathered_mib:,.0f} | {r.step_peak_mib:,.0f} | {r.save_peak_mib:,.0f} "
                     f"({r.save_peak_mib / r.step_peak_mib:.2f}) | {r.saved_mib:,.1f} | "
                     f"{r.step_s:.2f} |")
    return "\n".join(lines)


def _state(r: Row) -> float:
    return r.params_mib + r.optimizer_mib + r.other_mib


def verdicts(rows: list[Row]) -> list[str]:
    by = {r.label: r for r in rows}
    out = []
    one, full4 = by.get("world 1"), by.get("world 4, full (zero 3)")
    if one and full4:
        ratio = _state(full4) / _state(one)
        out.append(f"full sharding at world 4 holds {ratio:.2f}x the model state of world 1 "
                   f"(target <= 0.3x: {'met' if ratio <= 0.3 else 'NOT met'})")
    off, on = by.get("TP 2, no SP"), by.get("TP 2, SP")
    if off and on:
        out.append(f"sequence parallelism at TP 2 saves {on.saved_mib / off.saved_mib:.2f}x "
                   f"the activation bytes of TP 2 without it (the replicated norm and "
                   f"residual inputs are gone)")
    worst = max(rows, key=lambda r: r.save_peak_mib / r.step_peak_mib)
    ratio = worst.save_peak_mib / worst.step_peak_mib
    out.append(f"checkpoint-save peak at most {ratio:.2f}x the step peak (worst: "
               f"{worst.label}; target <= 1.1x: {'met' if ratio <= 1.1 else 'NOT met'})")
    errors = [abs(_state(r) / r.planner_mib - 1) for r in rows]
    out.append(f"the planner's model state is within {max(errors):.0%} of the measured "
               f"state (params + optimizer + other) in every case")
    return out


def main(argv: Optional[list[str]] = None) -> list[Row]:
    from benchmarks.attention import machine

    p = argument_parser(__doc__, METHOD)
    p.add_argument("--quick", action="store_true", help=f"smoke run: {sorted(QUICK)}")
    add_output_args(p)
    args = p.parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    rows = measure([c for c in CASES if not args.quick or c[0] in QUICK])
    print(f"# {machine()}")
    publish([asdict(r) for r in rows], parts=[
        f"`{command_line('benchmarks.model_state', argv)}` on {machine()}.", table(rows)],
        lines=verdicts(rows), method=METHOD, key="model_state", title=TITLE,
        out=None if args.quick else args.out, json_path=args.json, shown=1)
    return rows


if __name__ == "__main__":
    main()
