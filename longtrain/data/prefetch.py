"""Build batches ahead of the step on a background thread (bounded queue), so the step does
not wait on data.

The producer thread iterates the source and puts items in a queue of `depth`; the consumer
gets them in order. An exception in the producer is re-raised in the consumer at the point
where its item would have come; `close()` (or leaving a `with` block, or dropping the
prefetcher) stops the thread and closes the source.
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")

_ITEM, _END, _ERROR = 0, 1, 2
# how often a blocked producer checks whether it was stopped
_POLL_S = 0.05


def _produce(source: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    def put(message: tuple) -> bool:
        while not stop.is_set():
            try:
                out.put(message, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in source:
            if not put((_ITEM, item)):
                return
        put((_END, None))
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer
        put((_ERROR, exc))
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def _stop(stop: threading.Event, thread: threading.Thread, out: queue.Queue) -> None:
    stop.set()
    while True:
        try:
            out.get_nowait()
        except queue.Empty:
            break
    if thread is not threading.current_thread():
        thread.join(timeout=10)


class Prefetcher(Generic[T]):
    """Iterator over `source`'s items, produced up to `depth` ahead on a daemon thread."""

    def __init__(self, source: Iterator[T], *, depth: int, name: str = "longtrain-prefetch"
                 ) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth={depth} must be >= 1")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop_event = threading.Event()
        self._thread = threading.Thread(target=_produce, name=name, daemon=True,
                                        args=(source, self._queue, self._stop_event))
        self._done = False
        self._thread.start()
        # the thread holds no reference to self, so dropping the prefetcher stops it
        self._finalizer = weakref.finalize(self, _stop, self._stop_event, self._thread,
                                           self._queue)

    def __iter__(self) -> "Prefetcher[T]":
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _ITEM:
            return value
        self._done = True
        self.close()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the producer thread (idempotent) and close the source."""
        self._done = True
        self._finalizer()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prefetch(source: Iterator[T], *, depth: int) -> Iterator[T]:
    """`source` itself when depth == 0, else a `Prefetcher` of that depth."""
    return source if depth == 0 else Prefetcher(source, depth=depth)
