"""The prefetching iterator: order, bounded look-ahead, exceptions re-raised in the consumer,
clean shutdown (also of an endless or blocked source)."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

from longtrain.config.schema import DataConfig
from longtrain.data.loader import iterate, prefetched
from longtrain.data.prefetch import Prefetcher, prefetch


def _wait(predicate, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_items_in_order_and_the_look_ahead_is_bounded():
    produced = []

    def source():
        for i in range(20):
            produced.append(i)
            yield i

    with Prefetcher(source(), depth=3) as it:
        assert next(it) == 0
        # the producer runs ahead by at most the queue (3) plus the item it holds
        assert _wait(lambda: len(produced) >= 4)
        time.sleep(0.1)
        assert len(produced) <= 1 + 3 + 1
        assert list(it) == list(range(1, 20))
    assert not it.alive


def test_an_exception_in_the_producer_is_raised_in_the_consumer_after_good_items():
    closed = threading.Event()

    def source():
        try:
            yield 1
            yield 2
            raise KeyError("bad record 3")
        finally:
            closed.set()

    it = Prefetcher(source(), depth=2)
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(KeyError, match="bad record 3") as info:
        next(it)
    # the traceback reaches into the producer's frame
    assert any(tb.name == "source" for tb in info.traceback)
    assert closed.is_set() and _wait(lambda: not it.alive)
    with pytest.raises(StopIteration):
        next(it)


def test_close_stops_an_endless_source_and_closes_it():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    it = Prefetcher(endless(), depth=2)
    assert next(it) == 0
    it.close()
    assert _wait(lambda: not it.alive) and closed.is_set()
    with pytest.raises(StopIteration):
        next(it)
    it.close()


def test_dropping_the_prefetcher_stops_its_thread():
    def endless():
        while True:
            yield torch.zeros(3)

    it = Prefetcher(endless(), depth=1, name="dropped-prefetcher")
    next(it)
    thread = it._thread
    del it
    gc.collect()
    assert _wait(lambda: not thread.is_alive())


def test_a_slow_item_in_flight_does_not_block_close_forever():
    release = threading.Event()

    def slow():
        yield 0
        release.wait(0.5)
        yield 1

    it = Prefetcher(slow(), depth=1)
    assert next(it) == 0
    start = time.monotonic()
    it.close()
    assert time.monotonic() - start < 5 and _wait(lambda: not it.alive)


def test_depth_zero_is_the_source_itself_and_negative_is_refused():
    src = iter([1, 2])
    assert prefetch(src, depth=0) is src
    with pytest.raises(ValueError, match="depth=-1"):
        Prefetcher(iter([]), depth=-1)


def test_prefetched_loader_yields_the_same_micro_batches():
    d = DataConfig(seq_len=256, batch_size=4, micro_batch_size=2, prefetch=3)
    kw = dict(start_step=2, dp_size=2, dp_rank=0, cp_size=2, cp_rank=1)
    plain = iterate(d, **kw)
    with prefetched(d, iterate(d, **kw)) as ahead:
        for _ in range(4):
            for a, b in zip(next(ahead), next(plain)):
                assert torch.equal(a.tokens_bt, b.tokens_bt)
                assert torch.equal(a.positions_bt, b.positions_bt)
