"""Realtime first inside a worker process: bulk work yields at its checkpoints, never for long;
a realtime image's result is written without waiting for bulk results. The scorer tests use
real PostgreSQL and local fixture files."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import select

from worker.batching import MicroBatcher
from worker.db import make_engine, make_sessionmaker
from worker.detector import Detector
from worker.intake import create_scan
from worker.models import DONE, PROCESSING, Image
from worker.priority import RealtimeFirst
from worker.scoring import Scorer
from worker.storage import ObjectRef


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


# ------------------------------------------------------------------ in the scorer


def _scorer_with_images(settings_factory, pg_url: str, paths: list[Path]) -> tuple[Scorer, list[uuid.UUID]]:  # type: ignore[no-untyped-def]
    settings = settings_factory(database_url=pg_url)
    sessions = make_sessionmaker(make_engine(pg_url))
    with sessions.begin() as session:
        _, ids = create_scan(session, [ObjectRef(None, str(p)) for p in paths], origin="test", threshold=0.5)
    scorer = Scorer(settings, Detector.from_settings(settings), sessions=sessions, allow_local=True)
    return scorer, ids


def test_a_realtime_result_is_stored_while_bulk_results_wait_for_their_write(
    corpus_dir, settings_factory, pg_url
) -> None:
    real = sorted((corpus_dir / "real").iterdir())
    scorer, (bulk_id, realtime_id) = _scorer_with_images(settings_factory, pg_url, real[:2])
    write, entered, release = scorer._write_batch, threading.Event(), threading.Event()

    def held_write(items: list[Any]) -> list[Any]:
        entered.set()
        assert release.wait(60), "the test never released the write"
        return write(items)

    scorer.writer.close()
    scorer.writer = MicroBatcher(held_write, max_batch=8, max_wait_s=0.002)
    with scorer, ThreadPoolExecutor(2) as pool:
        bulk = pool.submit(scorer.process_image, bulk_id)
        assert entered.wait(60)  # the bulk result sits at the writer, its transaction not begun
        try:
            realtime = pool.submit(scorer.process_image, realtime_id, realtime=True).result(timeout=60)
            with scorer.sessions() as session:
                query = select(Image.id, Image.state).where(Image.id.in_([bulk_id, realtime_id]))
                states = dict(session.execute(query).all())
        finally:
            release.set()
        assert bulk.result(timeout=60).state == DONE
    assert realtime.state == DONE and realtime.changed
    assert states == {realtime_id: DONE, bulk_id: PROCESSING}
