"""Realtime first inside a worker process: bulk work yields at its checkpoints, never for long."""

from __future__ import annotations

import threading

from worker.priority import RealtimeFirst


def _checkpoint_in_thread(gate: RealtimeFirst) -> tuple[threading.Thread, threading.Event, list[float]]:
    done = threading.Event()
    waited: list[float] = []

    def run() -> None:
        waited.append(gate.checkpoint())
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, done, waited


def test_no_realtime_work_no_wait() -> None:
    assert RealtimeFirst().checkpoint() == 0.0


def test_bulk_waits_until_realtime_work_is_done() -> None:
    gate = RealtimeFirst(max_wait_s=60)
    with gate.realtime(), gate.realtime():
        thread, done, waited = _checkpoint_in_thread(gate)
        assert not done.wait(0.2)  # held while realtime work is in flight
        assert gate.in_flight == 2
    assert done.wait(10)
    thread.join()
    assert gate.in_flight == 0 and waited[0] > 0


def test_bulk_never_waits_longer_than_the_cap() -> None:
    gate = RealtimeFirst(max_wait_s=0.05)
    with gate.realtime():
        thread, done, waited = _checkpoint_in_thread(gate)
        assert done.wait(10)  # released by the cap while realtime work still runs
        thread.join()
        assert gate.in_flight == 1 and waited[0] >= 0.05


def test_a_failing_realtime_image_releases_the_gate() -> None:
    gate = RealtimeFirst(max_wait_s=60)
    try:
        with gate.realtime():
            raise ValueError("bad image")
    except ValueError:
        pass
    assert gate.in_flight == 0 and gate.checkpoint() == 0.0
