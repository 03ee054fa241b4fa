"""Overlap data loading with compute: batches are prepared by a background thread while the model trains,
and every step is timed as data wait (blocked on the next batch) vs compute (everything between two batches).

A thread, not DataLoader worker processes: the batch work (tar reads, numpy, torch collate) releases the GIL
for much of its time, nothing needs pickling, and it runs inside a Ray Train worker without extra processes.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_END = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """`items` in order, produced up to `depth` ahead by a daemon thread. An exception in the producer is
    raised to the consumer at the item where it happened; a consumer that stops early (break, an error, close)
    stops the producer too, so no thread is left blocked on a full queue."""
    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for x in items:
                if not put(x):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failed(e))
            return
        put(_END)

    t = threading.Thread(target=produce, name="densevse-prefetch", daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is _END:
                return
            if isinstance(x, _Failed):
                raise x.exc
            yield x
    finally:
        stop.set()
        t.join(timeout=5)


class StepTimer:
    """Seconds spent waiting for batches vs computing on them, over the steps of `iterate`."""

    def __init__(self):
        self.wait = self.compute = 0.0
        self.steps = 0

    def iterate(self, items: Iterable[T]) -> Iterator[T]:
        it = iter(items)
        while True:
            t0 = time.perf_counter()
            try:
                x = next(it)
            except StopIteration:
                return
            t1 = time.perf_counter()
            self.wait += t1 - t0
            yield x
            self.compute += time.perf_counter() - t1
            self.steps += 1

    def metrics(self) -> dict:
        """The epoch's entries: data_wait_s, compute_s and compute_share (compute / (compute + wait))."""
        if not self.steps:
            return {}
        total = self.wait + self.compute
        return {"data_wait_s": self.wait, "compute_s": self.compute,
                "compute_share": self.compute / total if total > 0 else 1.0}
