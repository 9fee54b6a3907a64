"""Autograd functions that save less than the composed ops would (exact forward and backward).

- `rms_norm`: saves its input and the per-row rstd (autograd on the composed ops keeps the
  float32 input, the normalized copy and more).
- `swiglu`: saves gate and up, not silu(gate) as well.
- `swiglu_down`: silu(gate) * up @ W^T saving gate and up only; the product, which the down
  projection would keep for its weight gradient, is recomputed elementwise in the backward
  (`memory.checkpointing=selective`). The caller reduces the partial output over TP.

Whatever they save still goes through the model's ActivationStore (int8, offload).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        # as transformers' LlamaRMSNorm: normalize in float32, round, then scale
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        dxhat = dy.float() * weight.float()
        dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        dw = (dy.float() * xhat.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0)
        return dx.to(x.dtype), dw.to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


def _swiglu_grads(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    g = gate.float()
    sig = torch.sigmoid(g)
    silu = g * sig
    dh = dh.float()
    dgate = dh * up.float() * sig * (1 + g * (1 - sig))
    return dgate.to(gate.dtype), (dh * silu).to(up.dtype)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        return _swiglu_grads(gate, up, dh)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(gate, up)


class _SwiGLUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor
                ) -> torch.Tensor:
        ctx.save_for_backward(gate, up, weight)
        return F.linear(F.silu(gate) * up, weight)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        gate, up, weight = ctx.saved_tensors
        h = F.silu(gate) * up
        dw = dy.reshape(-1, dy.shape[-1]).t().matmul(h.reshape(-1, h.shape[-1]))
        dgate, dup = _swiglu_grads(gate, up, dy.matmul(weight))
        return dgate, dup, dw.to(weight.dtype)


def swiglu_down(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(silu(gate) * up) @ weight^T, this rank's partial sum under TP."""
    return _SwiGLUDown.apply(gate, up, weight)
