"""The training loop on one rank: build, (import), step, report.

`train` is a generator of per-step metric dicts, identical on every rank (losses and norms
are reduced), so the caller decides who reports them.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from longtrain.attention.canary import ParityCanary
from longtrain.attention.canary import install as install_canary
from longtrain.attention.plan import cp_group_sizes
from longtrain.checkpoint.native import resolve_resume
from longtrain.config.schedule import Stage, stage_at, stage_config, stages
from longtrain.config.schema import RunConfig
from longtrain.data.loader import check_resume, data_state, iterate, prefetched
from longtrain.model.llama import LlamaModel
from longtrain.observability.flops import pairs_of_positions
from longtrain.observability.log import get_logger
from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.runtime import ParallelRuntime, remesh
from longtrain.parallel.watch import (CollectiveError, collective, describe_failure,
                                      is_communication_failure, set_phase, track_modules)
from longtrain.train.build import attention_context, build_model, param_dtype
from longtrain.train.loss import chunked_loss_sum, reduce_sum
from longtrain.train.metrics import StepMetrics
from longtrain.train.optim import Optimizer, make_optimizer
from longtrain.train.state import load_train_state, save_train_state


@dataclass
class TrainState:
    model: LlamaModel
    optimizer: Optimizer
    # the mesh the state lives on (a schedule stage that changes CP rebuilds it)
    runtime: ParallelRuntime
    step: int = 0
    # the checkpoint this state was restored from (None: a fresh start)
    resumed_from: Optional[str] = None
    # set from another thread (the worker's stop request): save and stop after this step
    stop_requested: threading.Event = field(default_factory=threading.Event)
    stopped: bool = False
    # the parity canary round the first softmax layer (attention.check_every > 0)
    canary: Optional[ParityCanary] = None

    @classmethod
    def create(cls, cfg: RunConfig, runtime: ParallelRuntime) -> "TrainState":
        """The model and optimizer at `checkpoint.resume` (any saved layout), or fresh ones
        (seeded or from `init.from`) at step 0."""
        torch.manual_seed(cfg.train.seed)
        resume = resolve_resume(cfg.checkpoint.resume, checkpoint_dir=cfg.checkpoint_dir)
        model = build_model(cfg, runtime, weights=resume is None)
        track_modules(model)
        dims = runtime.dims
        optimizer = make_optimizer(model, cfg.optim, total_steps=cfg.train.steps,
                                   runtime=runtime,
                                   micro_batches=cfg.data.batch_size // dims.dp
                                   // cfg.data.micro_batch_size)
        canary = install_canary(model) if cfg.attention.check_every > 0 else None
        state = cls(model, optimizer, runtime, canary=canary)
        if resume is None:
            return state
        manifest = load_train_state(resume, model=model, optimizer=optimizer, runtime=runtime)
        state.step = int(manifest["step"])
        state.resumed_from = resume
        stage_cfg = stage_config(cfg, stage_at(cfg, state.step))
        check_resume(stage_cfg.data, manifest["data"])
        if manifest["layout"]["world_size"] != runtime.dims.world_size:
            # The saved per-rank RNG streams do not map onto this world: a fresh, step-keyed one.
            torch.manual_seed(cfg.train.seed + state.step)
        get_logger().info("resumed from %s at step %d (saved at %s)", resume, state.step,
                          _describe_layout(manifest["layout"]))
        return state


def _describe_layout(layout: dict[str, int]) -> str:
    zero = f", ZeRO-{layout['zero']}" if layout.get("zero") else ""
    return (f"world={layout['world_size']} = tp {layout['tp']} x cp {layout['cp']} x dp "
            f"{layout['dp']}{zero}")


def checkpoint_meta(cfg: RunConfig, *, step: int) -> dict[str, Any]:
    """What a checkpoint's manifest records besides the tensors: the configs needed to
    rebuild the model, and the data position of the next step."""
    next_stage = stage_config(cfg, stage_at(cfg, step))
    return {"rope": dataclasses.asdict(cfg.rope), "precision": cfg.train.precision,
            "total_steps": cfg.train.steps, "optim": dataclasses.asdict(cfg.optim),
            "data": data_state(next_stage.data, step=step),
            "tokens_seen": sum(min(max(step - s.first_step, 0), s.end_step - s.first_step)
                               * cfg.data.batch_size * s.seq_len for s in stages(cfg))}


def _should_save(cfg: RunConfig, step: int) -> bool:
    every = cfg.checkpoint.every
    if step == cfg.train.steps:
        return cfg.checkpoint.save_final
    return every > 0 and step % every == 0


def _enter_stage(cfg: RunConfig, state: TrainState, stage: Stage) -> RunConfig:
    """The stage's config; rebuilds the mesh when the stage changes the CP degree."""
    scfg = stage_config(cfg, stage)
    if stage.cp != state.runtime.dims.cp:
        dims = ParallelDims.from_config(scfg.parallel)
        state.runtime = remesh(state.runtime, dims, timeout_s=cfg.parallel.timeout_s,
                               cp_sizes=cp_group_sizes(cfg.attention, stage.cp))
        # the gradients are summed over the new CP x DP group
        state.optimizer.set_group(state.runtime.dp_cp_group)
    if len(stages(cfg)) > 1:
        get_logger().info("stage %d: steps %d-%d at seq_len %d (%s)", stage.index,
                          stage.first_step + 1, stage.end_step, stage.seq_len,
                          state.runtime.dims.describe())
    return scfg


def train(cfg: RunConfig, runtime: ParallelRuntime, *, state: TrainState | None = None
          ) -> Iterator[dict[str, Any]]:
    """Run to `cfg.train.steps` optimizer steps (from `state.step`), stage by stage; yield
    one metrics dict per step. Saves checkpoints as `cfg.checkpoint` says."""
    if state is None:
        state = TrainState.create(cfg, runtime)
    with StepMetrics(cfg, state.runtime, dtype=param_dtype(cfg.train.precision)) as observer:
        for stage in stages(cfg):
            if state.stopped:
                return
            if state.step >= stage.end_step:
                continue
            scfg = _enter_stage(cfg, state, stage)
            observer.set_runtime(state.runtime)
            yield from _train_stage(scfg, state, end_step=stage.end_step, total_cfg=cfg,
                                    observer=observer)


def _train_stage(cfg: RunConfig, state: TrainState, *, end_step: int, total_cfg: RunConfig,
                 observer: StepMetrics) -> Iterator[dict[str, Any]]:
    log = get_logger()
    runtime = state.runtime
    dims = runtime.dims
    state.model.train()
    # built data.prefetch steps ahead on a background thread, closed however the loop ends
    data = prefetched(cfg.data, iterate(cfg.data, start_step=state.step, dp_size=dims.dp,
                                        dp_rank=runtime.dp_rank, cp_size=dims.cp,
                                        cp_rank=runtime.cp_rank))
    log.info("training %s for steps %d-%d (%s), %d tokens per step", cfg.model.name,
             state.step + 1, end_step, dims.describe(), cfg.data.batch_size * cfg.data.seq_len)
    try:
        while state.step < end_step and not state.stopped:
            try:
                metrics = _step(cfg, state, data, observer)
                stop = _agree_to_stop(state)
            except Exception as exc:
                if is_communication_failure(exc):
                    raise CollectiveError(describe_failure(
                        exc, rank=runtime.rank, step=state.step + 1,
                        timeout_s=cfg.parallel.timeout_s)) from exc
                raise
            if stop or _should_save(total_cfg, state.step):
                t_save = time.perf_counter()
                save_train_state(total_cfg.checkpoint_dir, step=state.step, model=state.model,
                                 optimizer=state.optimizer, runtime=runtime,
                                 keep=total_cfg.checkpoint.keep,
                                 meta=checkpoint_meta(total_cfg, step=state.step))
                metrics["checkpoint_save_s"] = time.perf_counter() - t_save
            if stop:
                state.stopped = True
                metrics["stopped"] = True
                log.info("stopped at step %d on request (checkpoint saved)", state.step)
            yield metrics
    finally:
        if hasattr(data, "close"):
            data.close()


def _agree_to_stop(state: TrainState) -> bool:
    """True on every rank when any rank was asked to stop (a preemption signal reaches the
    driver, which asks every worker; they may see it at different steps): all ranks then save
    and stop after the same step."""
    import torch.distributed as dist

    flag = torch.tensor([1.0 if state.stop_requested.is_set() else 0.0],
                        device=state.runtime.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        with collective("stop-request all-reduce", group="world"):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _step(cfg: RunConfig, state: TrainState, data: Iterator, observer: StepMetrics
          ) -> dict[str, Any]:
    """One optimizer step (all micro-batches); returns its metrics (identical on every rank)."""
    runtime, model, optimizer = state.runtime, state.model, state.optimizer
    ctx = attention_context(runtime, kernels=cfg.train.kernels)
    observer.start_step()
    t0 = time.perf_counter()
    batch = list(next(data))
    t_data = time.perf_counter() - t0
    # this rank's share of the causal same-document pairs (MFU counts those with packed
    # documents), from the per-document positions, on the host before the copy
    pairs = (sum(pairs_of_positions(mb.positions_bt) for mb in batch)
             if all(mb.doc_ids_bt is not None for mb in batch) else None)
    micro = [mb.to(runtime.device) for mb in batch]
    set_phase("loss", "token count")
    # the reductions over CP x DP are data-parallel work, also when dp = 1 makes that group
    # the CP group: their blocked time is charged to dp
    with collective("target-count all-reduce", group="CP x DP"), observer.timer.forced("dp"):
        targets = reduce_sum(sum(mb.target_weight for mb in micro), group=runtime.dp_cp_group,
                             device=runtime.device)
    optimizer.zero_grad()
    check = cfg.attention.check_every > 0 and state.step % cfg.attention.check_every == 0
    if check:
        if state.canary is not None:
            state.canary.arm(tol=cfg.attention.check_tol)
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    for i, mb in enumerate(micro):
        hidden = model(mb.tokens_bt, positions_bt=mb.positions_bt, doc_ids_bt=mb.doc_ids_bt,
                       seq_len=cfg.data.seq_len, ctx=ctx, head=False)
        loss = chunked_loss_sum(model.logits, hidden, mb.labels_bt, mb.weights_bt,
                                chunk=cfg.train.loss_chunk)
        optimizer.backward(loss / targets, last=i == len(micro) - 1)
        loss_sum += loss.detach().double()
    set_phase("optimizer", "gradient sum")
    with collective("gradient all-reduce", group="CP x DP"), observer.timer.forced("dp"):
        optimizer.reduce_gradients(group=runtime.dp_cp_group)
    with collective("gradient-norm all-reduce", group="tensor-parallel"):
        stats = optimizer.step(state.step, tp_group=runtime.tp_group)
    with collective("loss all-reduce", group="CP x DP"), observer.timer.forced("dp"):
        global_loss = reduce_sum(loss_sum, group=runtime.dp_cp_group,
                                 device=runtime.device) / targets
    dt = time.perf_counter() - t0
    state.step += 1
    tokens = cfg.data.batch_size * cfg.data.seq_len
    metrics = {"step": state.step, "loss": global_loss, "lr": stats["lr"],
               "grad_norm": stats["grad_norm"], "tokens": tokens, "tokens_per_s": tokens / dt,
               "step_time_s": dt, "data_wait_s": t_data, "seq_len": cfg.data.seq_len}
    if check:
        metrics["attn_parity_err"] = None if state.canary is None else state.canary.last_error
    observer.finish_step(cfg, metrics, pairs=pairs)
    return metrics
