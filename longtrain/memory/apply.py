"""A memory policy applied to a plain model from outside, the way torchtitan applies its
parallelisms: the model's code holds no policy, and `apply_memory_policy` wraps its parts.

- The whole forward runs under the store's saved-tensor hooks (a forward pre-hook enters
  `ActivationStore.forward`, a forward hook leaves it, also when the forward raises), and the
  RoPE tables every layer saves are shared once (a hook on the rotary module).
- Each layer's core attention function (`attn.attention`, or `attn.linear_attention` on a
  linear layer) runs inside the store's attention rule, and under `selective` is recomputed
  in the backward.
- `selective` also recomputes the SwiGLU product for the down projection's weight gradient
  (the MLP's `recompute_product` flag); `full` recomputes every decoder layer
  (each layer's forward is replaced by its checkpointed self).

The model is duck-typed: `layers` of decoder layers with `attn` and `mlp`, and `rotary`.
Parameter names do not change (nothing is re-parented), so checkpoints are unaffected.
`MemoryPolicy.remove` restores the plain model.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch
from torch import nn

from longtrain.memory.recompute import checkpointed
from longtrain.memory.storage import ActivationStore

CHECKPOINTING = ("none", "selective", "full")


def _core(fn: Callable[..., torch.Tensor], store: ActivationStore, *, recompute: bool
          ) -> Callable[..., torch.Tensor]:
    """An attention function (q, k, v, *rest) -> out under the store's attention rule,
    recomputed in the backward when `recompute`."""

    @functools.wraps(fn)
    def core(q_bthd: torch.Tensor, k_bthd: torch.Tensor, v_bthd: torch.Tensor, *rest: Any
             ) -> torch.Tensor:
        with store.attention(q_bthd.shape[-1]):
            if recompute:
                return checkpointed(lambda q, k, v: fn(q, k, v, *rest), q_bthd, k_bthd, v_bthd)
            return fn(q_bthd, k_bthd, v_bthd, *rest)

    return core


def _recomputed(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A decoder layer's forward(x, **kwargs), recomputed in the backward (when grads are on)."""

    def run(x_bth: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return forward(x_bth, *args, **kwargs)
        return checkpointed(lambda x: forward(x, *args, **kwargs), x_bth)

    return run


class MemoryPolicy:
    """What `apply_memory_policy` changed on one model; `remove` undoes it."""

    def __init__(self, model: nn.Module, store: ActivationStore, checkpointing: str) -> None:
        self.model, self.store, self.checkpointing = model, store, checkpointing
        self._undo: list[Callable[[], None]] = []
        self._scopes: list[contextlib.AbstractContextManager] = []

    def _set(self, obj: Any, name: str, value: Any) -> None:
        had = name in vars(obj)
        old = vars(obj).get(name)
        setattr(obj, name, value)
        self._undo.append(lambda: setattr(obj, name, old) if had else delattr(obj, name))

    def _enter(self, module: nn.Module, args: Any) -> None:
        scope = self.store.forward()
        scope.__enter__()
        self._scopes.append(scope)

    def _leave(self, module: nn.Module, args: Any, out: Any) -> None:
        if self._scopes:
            self._scopes.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        if getattr(self.model, "memory_policy", None) is self:
            del self.model.memory_policy


def apply_memory_policy(model: nn.Module, store: ActivationStore,
                        checkpointing: str = "none") -> MemoryPolicy:
    """Save `model`'s activations through `store` and recompute as `checkpointing` says
    (none | selective: core attention and the SwiGLU product | full: every decoder layer).
    A policy applied before is removed first. Returns the policy, also kept as
    `model.memory_policy` (for inspection: `model.memory_policy.store.stats`)."""
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"memory.checkpointing={checkpointing!r} is not one of "
                         f"{list(CHECKPOINTING)}")
    old = getattr(model, "memory_policy", None)
    if old is not None:
        old.remove()
    policy = MemoryPolicy(model, store, checkpointing)
    pre = model.register_forward_pre_hook(policy._enter)
    post = model.register_forward_hook(policy._leave, always_call=True)
    shared = model.rotary.register_forward_hook(lambda _m, _a, out: store.share(*out))
    policy._undo += [pre.remove, post.remove, shared.remove]
    selective = checkpointing == "selective"
    for layer in model.layers:
        attn = layer.attn
        name = "linear_attention" if hasattr(attn, "linear_attention") else "attention"
        policy._set(attn, name, _core(getattr(attn, name), store, recompute=selective))
        if selective:
            # SwiGLU's product silu(gate) * up recomputed for the down projection's weight
            # gradient instead of kept (the MLP's `recompute_product`)
            policy._set(layer.mlp, "recompute_product", True)
        if checkpointing == "full":
            policy._set(layer, "forward", _recomputed(layer.forward))
    policy._set(model, "memory_policy", policy)
    return policy


__all__ = ["CHECKPOINTING", "MemoryPolicy", "apply_memory_policy"]
