"""Realtime first inside one worker process.

The broker already hands a free thread realtime messages before bulk ones, but
the threads of a process share its cores: a realtime image decoded beside seven
bulk images takes several times as long as alone. While any realtime image is in
flight, bulk images therefore wait at their next CPU stage (decode, provenance,
preprocess), for at most ``max_wait_s`` each time, so a realtime burst can slow a
backfill but never stop it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


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
