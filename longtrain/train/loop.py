"""The training loop on one rank: build, (import), step, report.

`train` is a generator of per-step metric dicts, identical on every rank (losses and norms
are reduced), so the caller decides who reports them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from longtrain.attention.base import AttentionContext, get_attention
from longtrain.config.schema import RunConfig
from longtrain.data.loader import iterate, prefetched
from longtrain.model.llama import LlamaModel
from longtrain.model.sharding import init_weights, load_canonical
from longtrain.observability.log import get_logger
from longtrain.parallel.runtime import ParallelRuntime
from longtrain.train.loss import reduce_sum, token_loss_sum
from longtrain.train.optim import Optimizer, sum_gradients

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def param_dtype(precision: str) -> torch.dtype:
    if precision not in _DTYPES:
        raise ValueError(f"train.precision={precision!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[precision]


def build_model(cfg: RunConfig, runtime: ParallelRuntime) -> LlamaModel:
    """This rank's model shard with its weights: from `init.from` or seeded."""
    model = LlamaModel(cfg.model, cfg.rope, attention=get_attention(cfg.attention.backend),
                       tp=runtime.dims.tp, tp_rank=runtime.tp_rank,
                       dtype=param_dtype(cfg.train.precision), device=runtime.device)
    if cfg.init_from:
        from longtrain.checkpoint.source import open_source_weights

        with open_source_weights(cfg.init_from) as get:
            load_canonical(model, get)
    else:
        init_weights(model, seed=cfg.train.seed)
    return model


def attention_context(runtime: ParallelRuntime) -> AttentionContext:
    return AttentionContext(cp_group=runtime.cp_group, cp_size=runtime.dims.cp,
                            cp_rank=runtime.cp_rank, ulysses_group=runtime.ulysses_group,
                            ring_group=runtime.ring_group)


@dataclass
class TrainState:
    model: LlamaModel
    optimizer: Optimizer
    step: int = 0

    @classmethod
    def create(cls, cfg: RunConfig, runtime: ParallelRuntime) -> "TrainState":
        """A fresh model (seeded or from `init.from`) and its optimizer, at step 0."""
        model = build_model(cfg, runtime)
        return cls(model, Optimizer(model, cfg.optim, total_steps=cfg.train.steps))


def train(cfg: RunConfig, runtime: ParallelRuntime, *, state: TrainState | None = None
          ) -> Iterator[dict[str, Any]]:
    """Run `cfg.train.steps` optimizer steps; yield one metrics dict per step."""
    log = get_logger()
    torch.manual_seed(cfg.train.seed)
    if state is None:
        state = TrainState.create(cfg, runtime)
    model, optimizer = state.model, state.optimizer
    model.train()
    ctx = attention_context(runtime)
    dims = runtime.dims
    # built data.prefetch steps ahead on a background thread, closed however the loop ends
    data = prefetched(cfg.data, iterate(cfg.data, start_step=state.step, dp_size=dims.dp,
                                        dp_rank=runtime.dp_rank, cp_size=dims.cp,
                                        cp_rank=runtime.cp_rank))
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    log.info("training %s for %d steps (%s), %d tokens per step", cfg.model.name,
             cfg.train.steps, dims.describe(), tokens_per_step)
    try:
        while state.step < cfg.train.steps:
            t0 = time.perf_counter()
            micro = [mb.to(runtime.device) for mb in next(data)]
            t_data = time.perf_counter() - t0
            targets = reduce_sum(sum(mb.num_targets for mb in micro),
                                 group=runtime.dp_cp_group, device=runtime.device)
            optimizer.zero_grad()
            check = cfg.attention.check_every > 0 and state.step % cfg.attention.check_every == 0
            if check:
                model.arm_parity_check(tol=cfg.attention.check_tol)
            loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
            for mb in micro:
                logits = model(mb.tokens_bt, positions_bt=mb.positions_bt,
                               doc_ids_bt=mb.doc_ids_bt, seq_len=cfg.data.seq_len, ctx=ctx)
                loss = token_loss_sum(logits, mb.labels_bt)
                (loss / targets).backward()
                loss_sum += loss.detach().double()
            sum_gradients(optimizer.params, group=runtime.dp_cp_group)
            stats = optimizer.step(state.step, tp_group=runtime.tp_group)
            global_loss = reduce_sum(loss_sum, group=runtime.dp_cp_group,
                                     device=runtime.device) / targets
            dt = time.perf_counter() - t0
            state.step += 1
            extra = {}
            if check:
                extra["attn_parity_err"] = model.layers[0].attn.last_parity_error
            yield {
                **extra,
                "step": state.step,
                "loss": global_loss,
                "lr": stats["lr"],
                "grad_norm": stats["grad_norm"],
                "tokens": tokens_per_step,
                "tokens_per_s": tokens_per_step / dt,
                "step_time_s": dt,
                "data_wait_s": t_data,
                "seq_len": cfg.data.seq_len,
            }
    finally:
        if hasattr(data, "close"):
            data.close()
