"""A thread-safe, in-process micro-batcher.

Many threads each submit one item (a preprocessed image) and wait for its
result; one batching thread gathers up to ``max_batch`` items, or whatever has
arrived ``max_wait_s`` after the first of them, and makes one call for the
lot. An urgent item (a realtime image) ends that wait: its batch runs with
whatever is already queued. While that call runs, the submitting threads are
free to fetch and decode the next images, so I/O and decoding overlap the
forward pass.

A failing call fails exactly the callers of that batch, each with the same
exception; the next batch is unaffected. Nothing waits forever: ``close()``
finishes what was submitted and then refuses new work.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, Self, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


class BatcherClosed(RuntimeError):
    """Raised by ``submit`` after ``close`` was called."""


@dataclass(frozen=True)
class BatchStats:
    """What one call of the batch function saw; passed to ``on_batch``."""

    size: int
    fill_s: float  # from the first item's arrival to the call
    run_s: float  # the call itself
    ok: bool


_STOP = object()


class MicroBatcher(Generic[T, R]):
    """Collect single items into batches for ``fn(list[T]) -> Sequence[R]``."""

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int,
        max_wait_s: float,
        name: str = "microbatcher",
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._fn = fn
        self._max_batch = max_batch
        self._max_wait_s = max(0.0, max_wait_s)
        self._on_batch = on_batch
        self._queue: queue.Queue[object] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T, *, urgent: bool = False) -> Future[R]:
        """Queue one item; the future resolves with its result or its batch's error.

        ``urgent``: run its batch as soon as the batching thread is free, with
        whatever is queued by then, instead of waiting up to ``max_wait_s`` for more.
        """
        future: Future[R] = Future()
        # The lock orders submit against close: nothing slips in behind the stop marker.
        with self._lock:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            self._queue.put((item, future, time.monotonic(), urgent))
        return future

    def __call__(self, item: T, timeout: float | None = None, *, urgent: bool = False) -> R:
        """Submit one item and wait for its result."""
        return self.submit(item, urgent=urgent).result(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Run everything already submitted, then stop the batching thread."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        self._thread.join(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            _, _, first_arrival, urgent = first  # type: ignore[misc]
            deadline = first_arrival if urgent else first_arrival + self._max_wait_s
            while len(batch) < self._max_batch:
                remaining = deadline - time.monotonic()
                try:
                    entry = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if entry is _STOP:
                    stopping = True
                    break
                batch.append(entry)
                *_, entry_urgent = entry  # type: ignore[misc]
                if entry_urgent:
                    deadline = 0.0  # take only what is already queued
            self._run_batch(batch, first_arrival)  # type: ignore[arg-type]
        # Anything queued between the stop marker and here cannot exist (see submit).

    def _run_batch(self, batch: list[tuple[T, Future[R], float, bool]], first_arrival: float) -> None:
        live = [(item, fut) for item, fut, _, _ in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        started = time.monotonic()
        ok = False
        try:
            results = self._fn([item for item, _ in live])
            if len(results) != len(live):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} items")
            for (_, fut), result in zip(live, results, strict=True):
                fut.set_result(result)
            ok = True
        except BaseException as exc:  # noqa: BLE001 - every caller must hear about it, whatever it is
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(exc)
        finally:
            if self._on_batch is not None:
                try:
                    self._on_batch(
                        BatchStats(len(live), started - first_arrival, time.monotonic() - started, ok)
                    )
                except Exception:  # an observer must not break batching
                    log.exception("on_batch observer failed")
