"""`memory=auto`: the cheapest memory policy whose estimate (longtrain.memory.estimate) fits
the device; and the warning when the configured one does not."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from longtrain.memory.estimate import (GIB, configured_policy, device_budget_bytes, estimate_bytes,
                                       estimates)


def choose(cfg: Any, *, on_gpu: Optional[bool] = None) -> tuple[Any, str]:
    """(cfg with the chosen memory policy, a report of the candidates and the choice).

    Raises ValueError naming the sizes when no candidate fits."""
    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    budget = device_budget_bytes(cfg)
    table = sorted(estimates(cfg, on_gpu=on_gpu), key=lambda e: (e.cost, e.total))
    fits = [e for e in table if e.total <= budget]
    lines = [f"memory=auto: budget {budget / GIB:.2f} GiB per device; seq_len "
             f"{cfg.data.seq_len}, micro_batch {cfg.data.micro_batch_size}, tp "
             f"{cfg.parallel.tp}, cp {cfg.parallel.cp}",
             f"  {'policy':<24} {'activations GiB':>15} {'static GiB':>10} {'total GiB':>9} "
             f"{'time x':>6}  fits"]
    for e in table:
        lines.append(f"  {e.policy.name:<24} {e.activations / GIB:>15.3f} {e.static / GIB:>10.3f} "
                     f"{e.total / GIB:>9.3f} {e.cost:>6.2f}  {'yes' if e.total <= budget else 'no'}")
    if not fits:
        best = min(table, key=lambda e: e.total)
        raise ValueError(
            f"memory=auto: no memory policy fits memory.budget_gib={budget / GIB:.2f} per device "
            f"at data.seq_len={cfg.data.seq_len}, data.micro_batch_size="
            f"{cfg.data.micro_batch_size}, parallel.tp={cfg.parallel.tp}, parallel.cp="
            f"{cfg.parallel.cp}: the smallest, {best.policy.name}, needs "
            f"{best.total / GIB:.2f} GiB; raise parallel.cp or parallel.tp, or lower "
            f"data.micro_batch_size\n" + "\n".join(lines))
    pick = fits[0]
    lines.append(f"  chosen: {pick.policy.name} -- the fastest estimate that fits "
                 f"({pick.total / GIB:.2f} of {budget / GIB:.2f} GiB)")
    memory = dataclasses.replace(cfg.memory, activations=pick.policy.activations,
                                 checkpointing=pick.policy.checkpointing,
                                 offload=pick.policy.offload, auto=False)
    return dataclasses.replace(cfg, memory=memory), "\n".join(lines)


def over_budget_warning(cfg: Any, *, on_gpu: Optional[bool] = None) -> Optional[str]:
    """A line saying the configured policy's estimate exceeds the device memory, or None."""
    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    policy = configured_policy(cfg, on_gpu=on_gpu)
    mine = estimate_bytes(cfg, on_gpu=on_gpu)
    budget = device_budget_bytes(cfg)
    if mine <= budget:
        return None
    fits = [e for e in estimates(cfg, on_gpu=on_gpu) if e.total <= budget]
    hint = (f"memory=auto would pick {min(fits, key=lambda e: e.cost).policy.name}" if fits
            else "no memory policy fits: raise parallel.cp or parallel.tp")
    return (f"memory estimate {mine / GIB:.2f} GiB per device for memory "
            f"{policy.name} exceeds {budget / GIB:.2f} GiB ({hint})")
