"""Realtime first inside one worker process.

The broker already hands a free thread realtime messages before bulk ones, but
the threads of a process share its cores: a realtime image decoded beside seven
bulk images takes several times as long as alone. While any realtime image is in
flight, bulk images therefore wait at their next CPU stage (decode, provenance,
preprocess), for at most ``max_wait_s`` each time, so a realtime burst can slow a
backfill but never stop it.

A thread holding a bulk chunk also hands the chunk's rest back when realtime
messages wait on the broker (:class:`WaitingProbe`): otherwise a realtime
message would wait for a whole chunk to end before any thread took it. In a
worker that takes both lanes, one thread stands by (:class:`BulkSlots`): it holds
a bulk chunk unclaimed and gives it back the moment a realtime message waits, so
that message finds a free thread without waiting for a busy one to end an image.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class RealtimeFirst:
    """Counts realtime work in flight; other work yields to it at checkpoints."""

    def __init__(self, max_wait_s: float = 1.0) -> None:
        self.max_wait_s = max_wait_s
        self._cond = threading.Condition()
        self._in_flight = 0

    @contextmanager
    def realtime(self) -> Iterator[None]:
        """Mark the enclosed work as realtime: other threads' checkpoints wait for it."""
        with self._cond:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._cond.notify_all()

    def checkpoint(self) -> float:
        """Wait while realtime work is in flight (at most ``max_wait_s``); the seconds waited."""
        with self._cond:
            if self._in_flight == 0:
                return 0.0
            started = time.monotonic()
            self._cond.wait_for(lambda: self._in_flight == 0, timeout=self.max_wait_s)
            return time.monotonic() - started

    @property
    def in_flight(self) -> int:
        return self._in_flight


class WaitingProbe:
    """How many messages wait for this process's threads on a queue, asked of the broker at most
    once per ``interval_s`` by all of them together.

    A thread holding a bulk chunk asks between images, and one standing by asks every
    ``interval_s``; only the thread whose question reaches the broker hears the count, so one
    waiting message frees one thread, not every thread at once. A broker that cannot answer
    counts as nothing waiting: the chunk goes on.
    """

    def __init__(self, probe: Callable[[], int], interval_s: float = 0.01) -> None:
        self._probe = probe
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._next = 0.0

    def __call__(self) -> int:
        """Messages waiting, as the broker answered this thread's question; 0 when another thread's
        question within ``interval_s`` took the answer, or the broker did not answer."""
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                return 0
            self._next = now + self.interval_s
        try:
            return max(0, self._probe())
        except Exception as exc:  # noqa: BLE001 - kombu raises many kinds; not this chunk's problem
            log.debug("could not ask the broker for waiting messages: %s", exc)
            return 0


class BulkSlots:
    """How many threads of a worker that takes both lanes may score bulk chunks at once.

    A thread handed a chunk while every slot is taken stands by with the chunk unclaimed: it takes
    the first slot that frees, or gives the chunk back when ``give_up`` says so (a realtime message
    waits, the worker stops). Its thread is then free for the realtime message at once; a thread
    inside a chunk would first have to end the image in hand.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("bulk needs at least one slot")
        self.capacity = capacity
        self._cond = threading.Condition()
        self._busy = 0
        self._standing_by = 0

    @property
    def standing_by(self) -> int:
        """Threads holding a chunk unclaimed, each ready to give it back for a realtime message."""
        return self._standing_by

    def acquire(self, give_up: Callable[[], bool], poll_s: float) -> bool:
        """Take a slot (True), or give up waiting for one (False); ``give_up`` is asked every ``poll_s``."""
        with self._cond:
            if self._busy < self.capacity:
                self._busy += 1
                return True
            self._standing_by += 1
        try:
            while True:
                with self._cond:
                    if self._cond.wait_for(lambda: self._busy < self.capacity, timeout=poll_s):
                        self._busy += 1
                        return True
                if give_up():
                    return False
        finally:
            with self._cond:
                self._standing_by -= 1

    def release(self) -> None:
        with self._cond:
            self._busy -= 1
            self._cond.notify()
