"""`optim.zero=1|2`: DeepSpeed ZeRO behind the same interface as `optim.Optimizer`.

The DeepSpeed engine gets megatron-core's parallel state as its model-parallel unit: the
tensor-parallel group is its model-parallel group (gradient norms sum TP shards once), and its
data-parallel group is CP x DP, the group our gradients are summed over (each CP rank holds a
different part of the sequence). ZeRO-1 shards the AdamW state (and the fp32 masters) over that
group, ZeRO-2 the gradients as well.

Our loss is already divided by the global target count, so gradients are to be summed over
CP x DP; DeepSpeed averages them, so `backward` multiplies the loss by the group size, and
tells the engine not to divide by the micro-batch count either.

Checkpoints stay in the native, reshardable format: `materialized()` gathers each parameter's
full fp32 master and moments from the shards (DeepSpeed's safe_get_full_* helpers) into the
same attributes the plain Optimizer has, and writes them back into the shards after a load.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from longtrain.config.schema import OptimConfig
from longtrain.parallel.deepspeed_comm import ensure_deepspeed_comm
from longtrain.train.lr import decay_groups, lr_at

_MOMENTS = ("exp_avg", "exp_avg_sq")


class _Mpu:
    """DeepSpeed's model-parallel unit over our runtime's megatron-core groups."""

    def __init__(self, runtime: Any) -> None:
        self.rt = runtime

    def get_model_parallel_rank(self) -> int:
        return self.rt.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.rt.dims.tp

    def get_model_parallel_group(self) -> Any:
        return self.rt.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_global_rank(self.rt.tp_group, 0) if self.rt.tp_group else 0

    def get_data_parallel_group(self) -> Any:
        return self.rt.dp_cp_group

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.rt.dp_cp_group)

    def get_data_parallel_world_size(self) -> int:
        return self.rt.dims.dp * self.rt.dims.cp

    def get_sequence_parallel_world_size(self) -> int:
        return 1  # CP is handled by our attention, inside the data-parallel group above


class ZeroOptimizer:
    """AdamW with ZeRO stage `cfg.zero` (1 or 2) through a DeepSpeed engine."""

    def __init__(self, model: nn.Module, cfg: OptimConfig, *, total_steps: int, runtime: Any,
                 micro_batches: int) -> None:
        ensure_deepspeed_comm()
        import deepspeed

        # the engine picks its device from LOCAL_RANK, which init_parallel published
        self.cfg, self.total_steps, self.runtime = cfg, total_steps, runtime
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.mixed = any(p.dtype != torch.float32 for p in self.params)
        self.group_size = runtime.dims.dp * runtime.dims.cp
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": max(1, micro_batches),
            "zero_optimization": {"stage": cfg.zero, "overlap_comm": False,
                                  "contiguous_gradients": True, "reduce_scatter": True},
            "optimizer": {"type": "AdamW", "params": {
                "lr": cfg.lr, "betas": [cfg.beta1, cfg.beta2], "eps": cfg.eps,
                "weight_decay": cfg.weight_decay, "torch_adam": True}},
            "gradient_clipping": cfg.grad_clip,
            "bf16": {"enabled": self.mixed},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=decay_groups(self.params, cfg.weight_decay),
            config=ds_config, mpu=_Mpu(runtime))
        self._step_count = 0
        # filled by materialized(): the plain Optimizer's attributes, for checkpoints
        self.master: list[torch.Tensor] = []
        self.inner = SimpleNamespace(state={})

    def set_group(self, group: Any) -> None:
        """ZeRO refuses schedules that change CP (planning.validate): nothing to do."""

    def zero_grad(self) -> None:
        """The engine clears its gradients after each step."""

    def backward(self, loss: torch.Tensor, *, last: bool = True) -> None:
        """Backward of one micro-batch's share of the global loss (see the module docstring);
        `last`: the step's last micro-batch, after which the gradients are reduced."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss * self.group_size, scale_wrt_gas=False)

    def reduce_gradients(self, *, group: Any) -> None:
        """The engine reduces (ZeRO: reduce-scatters) in its own backward hooks."""

    @torch.no_grad()
    def step(self, step: int, *, tp_group: Any) -> dict[str, float]:
        lr = lr_at(step, cfg=self.cfg, total_steps=self.total_steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        self._step_count += 1
        if self._step_count == 1:
            self._relink_optimizer_state()
        norm = self.engine.get_global_grad_norm()
        return {"lr": lr, "grad_norm": float(norm) if norm is not None else float("nan")}

    def _relink_optimizer_state(self) -> None:
        """DeepSpeed links each parameter to its slice of the AdamW moments once, right after
        the first parameter group's first step, when the other groups' moments do not exist
        yet (so safe_get_full_optimizer_state finds none for our no-decay group): link again
        now that every group has stepped."""
        zero = self.engine.optimizer
        if hasattr(zero, "_hp_optimizer_states_linked"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _create_optimizer_state(self, step: int) -> None:
        """AdamW state for every shard (zero moments at `step`), as torch creates it at the
        first step, so that a checkpoint's moments can be written into it."""
        zero = self.engine.optimizer
        for part in zero.single_partition_of_fp32_groups:
            state = zero.optimizer.state[part]
            state["step"] = torch.tensor(float(step))
            for key in _MOMENTS:
                if key not in state:
                    state[key] = torch.zeros_like(part, memory_format=torch.preserve_format)
        self._relink_optimizer_state()

    @contextlib.contextmanager
    def materialized(self, *, load: bool = False) -> Iterator[None]:
        """Full fp32 masters and AdamW moments per parameter in `master` / `inner.state` (a
        collective over CP x DP); with load=True whatever was written into them (a checkpoint
        load) goes back into the shards and the parameters on exit."""
        from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                                     safe_set_full_fp32_param, safe_set_full_optimizer_state)

        self.master, self.inner.state = [], {}
        for p in self.params:
            m = safe_get_full_fp32_param(p).detach().clone()
            state = {"step": torch.tensor(float(self._step_count))}
            for key in _MOMENTS:
                value = safe_get_full_optimizer_state(p, key) if self._step_count else None
                state[key] = torch.zeros_like(m) if value is None else value.detach().clone()
            self.master.append(m)
            self.inner.state[m] = state
        try:
            yield
            if load:
                steps = {float(s["step"]) for s in self.inner.state.values()}
                self._step_count = int(max(steps)) if steps else 0
                self._create_optimizer_state(self._step_count)
                for p, m in zip(self.params, self.master):
                    safe_set_full_fp32_param(p, m)
                    for key in _MOMENTS:
                        safe_set_full_optimizer_state(p, self.inner.state[m][key], key)
                    p.data.copy_(m.to(p.dtype))
        finally:
            self.master, self.inner.state = [], {}
