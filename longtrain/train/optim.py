"""AdamW with warmup + cosine, gradient clipping across TP shards, gradient sum over
CP x DP (bucketed and overlapped with the backward: train.grad_reduce), and fp32 master
weights when the model runs in bf16."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from longtrain.config.schema import OptimConfig
from longtrain.train.fsdp import local, shard_model
from longtrain.train.grad_reduce import GradReducer, sum_flat
from longtrain.train.lr import decay_groups, lr_at
from longtrain.train.zero import MOMENTS, ZeroOptimizer


def make_optimizer(model: nn.Module, cfg: OptimConfig, *, total_steps: int, runtime=None,
                   micro_batches: int = 1):
    """The plain Optimizer; with optim.zero=1|2 the DeepSpeed ZeRO one (train.zero); with
    optim.zero=3 the one over FSDP2-sharded parameters (it shards the model: train.fsdp)."""
    if cfg.zero == 3:
        return ShardedOptimizer(model, cfg, total_steps=total_steps, runtime=runtime)
    if cfg.zero:
        return ZeroOptimizer(model, cfg, total_steps=total_steps, runtime=runtime,
                             micro_batches=micro_batches)
    return Optimizer(model, cfg, total_steps=total_steps,
                     group=None if runtime is None else runtime.dp_cp_group)


def sum_sequence_parallel(params: list[nn.Parameter], grads: list[Optional[torch.Tensor]], *,
                          tp_group) -> None:
    """Sum over the TP group the gradients of the parameters that saw only this rank's share
    of the sequence (`sequence_parallel`: the norms under Megatron sequence parallelism)."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return
    sum_flat([g for p, g in zip(params, grads)
              if g is not None and getattr(p, "sequence_parallel", False)], group=tp_group)


def grad_norm(params: list[nn.Parameter], *, tp_group,
              grads: Optional[list[Optional[torch.Tensor]]] = None,
              shard_group: Any = None) -> torch.Tensor:
    """Global L2 norm of the gradients (`grads`, default each parameter's .grad): TP-sharded
    parameters summed over the TP group, replicated ones counted once; with `shard_group`
    (FSDP) each rank's gradients are its shards, summed over that group first."""
    sharded: torch.Tensor | float = 0.0
    replicated: torch.Tensor | float = 0.0
    grads = [p.grad for p in params] if grads is None else grads
    for p, g in zip(params, grads):
        if g is None:
            continue
        sq = g.detach().double().pow(2).sum()
        if getattr(p, "tensor_model_parallel", False):
            sharded = sharded + sq
        else:
            replicated = replicated + sq
    device = params[0].device if params else torch.device("cpu")
    total = torch.stack([torch.as_tensor(sharded, dtype=torch.float64, device=device),
                         torch.as_tensor(replicated, dtype=torch.float64, device=device)])
    if shard_group is not None and dist.get_world_size(shard_group) > 1:
        dist.all_reduce(total, group=shard_group)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        # Only the sharded part differs between TP ranks.
        shard_sq = total[:1].clone()
        dist.all_reduce(shard_sq, group=tp_group)
        total = torch.cat([shard_sq, total[1:]])
    return total.sum().sqrt()


class Optimizer:
    """AdamW over fp32 parameters. When the model's parameters are not fp32, the optimizer
    keeps fp32 master copies and writes rounded values back after each step."""

    # the group each rank's gradients are shards over (ShardedOptimizer: CP x DP)
    shard_group: Any = None

    def __init__(self, model: nn.Module, cfg: OptimConfig, *, total_steps: int,
                 group: Any = None) -> None:
        self.cfg = cfg
        self.total_steps = total_steps
        self.params = [p for p in model.parameters() if p.requires_grad]
        # the gradients' owner when they are summed over a group of more than one rank
        self.reducer: Optional[GradReducer] = None
        self.set_group(group)
        self.grads: list[Optional[torch.Tensor]] = []
        self.mixed = any(p.dtype != torch.float32 for p in self.params)
        self.master = ([p.detach().float().clone() for p in self.params] if self.mixed
                       else self.params)
        self.inner = torch.optim.AdamW(decay_groups(self.master, cfg.weight_decay),
                                       lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)

    def set_group(self, group: Any) -> None:
        """The CP x DP group after a schedule stage rebuilt the groups (`remesh`)."""
        if self.reducer is not None:
            self.reducer.remove()
            for p in self.params:
                p.grad = None
        self.reducer = (GradReducer(self.params, group=group, dtype=self.cfg.grad_reduce_dtype,
                                    bucket_mb=self.cfg.grad_bucket_mb)
                        if group is not None and dist.get_world_size(group) > 1 else None)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        if self.reducer is not None:
            self.reducer.zero()

    def backward(self, loss: torch.Tensor, *, last: bool = True) -> None:
        """Backward of one micro-batch's share of the global loss (`last`: of this step; its
        buckets start summing during it)."""
        if self.reducer is not None:
            self.reducer.begin_backward(last=last)
        loss.backward()

    def reduce_gradients(self, *, group) -> None:
        """Finish summing the gradients over `group` (CP x DP, the group the optimizer was
        made with): wait for the buckets still in flight."""
        if self.reducer is not None:
            self.grads = list(self.reducer.finish())
            return
        self.grads = [p.grad for p in self.params]
        if group is None or dist.get_world_size(group) == 1:
            return
        # an optimizer made without the group (no reducer): one parameter at a time, after
        # the backward, in the reduction dtype
        wide = self.cfg.grad_reduce_dtype == "fp32"
        for g in self.grads:
            if g is None:
                continue
            if wide and g.dtype != torch.float32:
                g32 = g.float()
                dist.all_reduce(g32, group=group)
                g.copy_(g32)
            else:
                dist.all_reduce(g, group=group)

    def held_state(self) -> list[dict[str, Any]]:
        """Per parameter (in `params` order) its fp32 master and AdamW moments as this rank
        holds them, for checkpoints (`checkpoint.chunks.held_parts`); zero moments for
        parameters not stepped yet (a checkpoint at step 0)."""
        out = []
        for m in self.master:
            state = self.inner.state[m]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                for key in MOMENTS:
                    state[key] = torch.zeros_like(m, memory_format=torch.preserve_format)
            out.append({"master": m, **{key: state[key] for key in MOMENTS}})
        return out

    @property
    def step_count(self) -> int:
        """AdamW's step count (the largest: a parameter that never had a gradient has none)."""
        return max((int(self.inner.state[m]["step"]) for m in self.master
                    if self.inner.state[m]), default=0)

    @torch.no_grad()
    def loaded(self, step: int) -> None:
        """After a checkpoint filled the masters and moments: the step count, and in mixed
        precision the model's parameters rounded from the masters."""
        for m in self.master:
            self.inner.state[m]["step"] = torch.tensor(float(step))
        if self.mixed:
            for p, m in zip(self.params, self.master):
                p.copy_(m.to(p.dtype))

    @torch.no_grad()
    def step(self, step: int, *, tp_group) -> dict[str, float]:
        """Clip, update with the LR of `step`; returns {'lr', 'grad_norm'}."""
        grads = self.grads or [p.grad for p in self.params]
        shards = [None if g is None else local(g) for g in grads]
        sum_sequence_parallel(self.params, shards, tp_group=tp_group)
        norm = float(grad_norm(self.params, tp_group=tp_group, grads=shards,
                               shard_group=self.shard_group))
        if self.mixed:
            for m, g in zip(self.master, grads):
                m.grad = None if g is None else g.float()
        else:
            for p, g in zip(self.params, grads):
                p.grad = g
        scale = 1.0
        if self.cfg.grad_clip > 0 and norm > self.cfg.grad_clip:
            scale = self.cfg.grad_clip / (norm + 1e-6)
        if scale != 1.0:
            for m in self.master:
                if m.grad is not None:
                    m.grad.mul_(scale)
        lr = lr_at(step, cfg=self.cfg, total_steps=self.total_steps)
        for group in self.inner.param_groups:
            group["lr"] = lr
        self.inner.step()
        if self.mixed:
            for p, m in zip(self.params, self.master):
                p.copy_(m.to(p.dtype))
            for m in self.master:
                m.grad = None
        self.grads = []
        return {"lr": lr, "grad_norm": norm}


class ShardedOptimizer(Optimizer):
    """The plain Optimizer over FSDP2-sharded fp32 parameters (`optim.zero=3`,
    `fsdp.shard_model`): AdamW updates each rank's shards, which are also the master
    weights; the gradients arrive reduce-scattered from FSDP's backward hooks, and their norm
    sums the shards over CP x DP (and TP)."""

    def __init__(self, model: nn.Module, cfg: OptimConfig, *, total_steps: int,
                 runtime: Any) -> None:
        shard_model(model, runtime, reduce_dtype=cfg.grad_reduce_dtype)
        super().__init__(model, cfg, total_steps=total_steps)
        self.shard_group = runtime.dp_cp_group

    def set_group(self, group: Any) -> None:
        """The shards live on the CP x DP group they were made on: a schedule that changes CP
        is refused with ZeRO (planning.validate), and any other group is an error."""
        if group is not None and self.shard_group is not None and group is not self.shard_group:
            raise ValueError("optim.zero=3 shards the model over one CP x DP group; a schedule "
                             "stage may not change parallel.cp (planning.validate refuses it)")

    def reduce_gradients(self, *, group: Any) -> None:
        """FSDP reduce-scattered the gradients during the backward."""
        self.grads = [p.grad for p in self.params]
