"""Emulated links (`longtrain.parallel.emulate`): each call's time is the collective_cost
formula for its bytes; a delayed work handle never returns before its link time, counted from
its start, or from the message's arrival when the receive had to wait for it."""

from __future__ import annotations

import time

import pytest
import torch

from longtrain.parallel import collective_cost as cc
from longtrain.parallel.emulate import _DelayedWork, dilation_for, link_seconds

LINK = cc.Link(gbytes_per_s=1.0, latency_s=1e-3)


def test_each_call_costs_its_collective_formula() -> None:
    t = torch.zeros(1000, dtype=torch.float32)  # 4000 bytes
    n = 4000.0
    assert link_seconds("isend", {"tensor": t, "dst": 1}, c=4, link=LINK) == pytest.approx(LINK.time(n))
    assert link_seconds("all_reduce", {"tensor": t}, c=4, link=LINK) == pytest.approx(
        2 * 3 * LINK.time(n / 4))
    assert link_seconds("all_gather", {"tensor_list": [t] * 4, "tensor": t}, c=4, link=LINK) == pytest.approx(
        3 * LINK.time(n))
    assert link_seconds("all_gather_into_tensor",
                        {"output_tensor": torch.zeros(4000), "input_tensor": t}, c=4,
                        link=LINK) == pytest.approx(3 * LINK.time(n))
    assert link_seconds("reduce_scatter_tensor", {"output": t[:250], "input": t}, c=4,
                        link=LINK) == pytest.approx(3 * LINK.time(n / 4))
    # a group of one moves nothing
    assert link_seconds("all_reduce", {"tensor": t}, c=4, link=LINK) > 0
    assert link_seconds("all_reduce", {"tensor": t}, c=1, link=LINK) == 0.0


class _Work:
    def __init__(self, takes: float) -> None:
        self.takes = takes

    def wait(self) -> bool:
        time.sleep(self.takes)
        return True

    def is_completed(self) -> bool:
        return True


def test_delayed_work_waits_for_the_link_from_its_start_or_the_arrival() -> None:
    start = time.perf_counter()
    # a send (or a receive whose message was already here): from the start
    assert _DelayedWork(_Work(0.0), start, 0.05, receive=False).wait() is True
    assert time.perf_counter() - start >= 0.05
    # a receive that waited 0.03 s for its sender: the link time after the arrival
    start = time.perf_counter()
    _DelayedWork(_Work(0.03), start, 0.05, receive=True).wait()
    assert time.perf_counter() - start >= 0.08
    # other attributes pass through
    assert _DelayedWork(_Work(0.0), start, 0.0, receive=False).is_completed()


def test_dilation_is_the_ratio_of_achieved_gemm_rates() -> None:
    assert dilation_for(1000.0, 0.5, 0.25) == pytest.approx(2000.0)
    with pytest.raises(ValueError, match="measured_tflops"):
        dilation_for(1000.0, 0.5, 0.0)
