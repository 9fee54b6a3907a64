"""`optim.zero=1|2`: DeepSpeed ZeRO behind the same interface as `optim.Optimizer`.

The DeepSpeed engine gets megatron-core's parallel state as its model-parallel unit: the
tensor-parallel group is its model-parallel group (gradient norms sum TP shards once), and its
data-parallel group is CP x DP, the group our gradients are summed over (each CP rank holds a
different part of the sequence). ZeRO-1 shards the AdamW state (and the fp32 masters) over that
group, ZeRO-2 the gradients as well.

Our loss is already divided by the global target count, so gradients are to be summed over
CP x DP; DeepSpeed averages them, so `backward` multiplies the loss by the group size, and
tells the engine not to divide by the micro-batch count either.

Checkpoints stay in the native, reshardable format without gathering anything: `held_state`
gives each parameter's fragment of the flat fp32 partitions (DeepSpeed's `_hp_mapping`), and
the checkpoint writes and reads those fragments as chunks of the canonical tensors
(`longtrain.checkpoint.chunks`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from longtrain.checkpoint.chunks import Fragment
from longtrain.config.schema import OptimConfig
from longtrain.parallel.deepspeed_comm import ensure_deepspeed_comm
from longtrain.train.lr import decay_groups, lr_at

# the AdamW state a checkpoint keeps per parameter, besides its fp32 master
MOMENTS = ("exp_avg", "exp_avg_sq")


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
        bucket = max(1, int(cfg.grad_bucket_mb * 2 ** 20 / 4))  # fp32 elements
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": max(1, micro_batches),
            "zero_optimization": {"stage": cfg.zero, "overlap_comm": False,
                                  "contiguous_gradients": True, "reduce_scatter": True,
                                  # DeepSpeed's default buckets hold 5e8 elements (2 GB in
                                  # fp32): sized like our own gradient buckets instead
                                  "reduce_bucket_size": bucket,
                                  "allgather_bucket_size": bucket},
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
            for key in MOMENTS:
                if key not in state:
                    state[key] = torch.zeros_like(part, memory_format=torch.preserve_format)
        self._relink_optimizer_state()

    def held_state(self) -> list[dict[str, Any]]:
        """Per parameter (in `params` order), this rank's fragments of its fp32 master and
        AdamW moments (`Fragment`s of the flattened parameter; empty where this rank holds
        none of it), viewing DeepSpeed's partitions: a checkpoint writes them and a load
        fills them in place, nothing is gathered."""
        if not self._step_count:
            self._create_optimizer_state(0)
        out = []
        for p in self.params:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                empty = Fragment(tuple(p.shape), 0, torch.empty(0, dtype=torch.float32))
                out.append({key: empty for key in ("master", *MOMENTS)})
                continue
            start = mapping.lp_fragment_address.start
            out.append({"master": Fragment(tuple(p.shape), start, mapping.hp_fragment.data),
                        **{key: Fragment(tuple(p.shape), start,
                                         mapping.get_optim_state_fragment(key))
                           for key in MOMENTS}})
        return out

    @property
    def step_count(self) -> int:
        return self._step_count

    def loaded(self, step: int) -> None:
        """After a checkpoint filled the fragments: the step count, and the model's own
        (full, per rank) parameters from the masters (DeepSpeed's all-gather of the
        partitions)."""
        self._step_count = step
        zero = self.engine.optimizer
        for part in zero.single_partition_of_fp32_groups:
            zero.optimizer.state[part]["step"] = torch.tensor(float(step))
        zero.update_lp_params()
