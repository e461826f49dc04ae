"""Batched result writes: concurrent results share one transaction, with per-image semantics intact.

Real PostgreSQL. Two Scorers on two engines stand for two worker processes.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Engine, event, func, select, text
from sqlalchemy.exc import DataError

from worker.clients import create_client
from worker.db import make_engine, make_sessionmaker
from worker.detector import Detector
from worker.errors import TransientError
from worker.intake import create_scan
from worker.models import DONE, FAILED, PROCESSING, QUEUED, Image, Scan, WebhookDelivery
from worker.scoring import Scorer, ScoreResult
from worker.storage import ObjectRef
from worker.webhooks import EVENT_IMAGE_FLAGGED, EVENT_SCAN_COMPLETED

WRITER_THREAD = "synthguard-writer"


def _result(score: float, fmt: str = "png") -> ScoreResult:
    return ScoreResult(
        etag='"etag"',
        version_id=None,
        sha256="0" * 64,
        size_bytes=1234,
        format=fmt,
        width=8,
        height=8,
        score=score,
        provenance={"ai": False, "signals": {}},
        provenance_ai=False,
    )


class WriterWatch:
    """What the writer threads of an engine did: commits, and images per UPDATE of images."""

    def __init__(self, engine: Engine) -> None:
        self.commits = 0
        self.images_per_write: list[int] = []
        self._lock = threading.Lock()
        event.listen(engine, "commit", self._commit)
        event.listen(engine, "before_cursor_execute", self._statement)

    def _commit(self, _conn: Any) -> None:
        if threading.current_thread().name == WRITER_THREAD:
            with self._lock:
                self.commits += 1

    def _statement(
        self, _conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any, many: bool
    ) -> None:
        if threading.current_thread().name == WRITER_THREAD and statement.startswith("UPDATE images SET"):
            with self._lock:
                self.images_per_write.append(len(params) if many else 1)


def _scored(flagged: str) -> float:
    return REGISTRY.get_sample_value("synthguard_images_scored_total", {"flagged": flagged}) or 0.0


def test_concurrent_results_of_two_scans_from_two_processes_are_stored_once_each(
    settings_factory, pg_url
) -> None:
    settings = settings_factory(database_url=pg_url, batch_size=8)
    detector = Detector.from_settings(settings)
    engines = [make_engine(pg_url), make_engine(pg_url)]
    watches = [WriterWatch(engine) for engine in engines]
    sessions = make_sessionmaker(engines[0])
    events = [EVENT_IMAGE_FLAGGED, EVENT_SCAN_COMPLETED]
    with sessions.begin() as session:
        client = create_client(session, "hooks", all_buckets=True, webhook_url="https://hooks.example/in").client
        scans = {}
        for name, count in (("a", 30), ("b", 18)):
            refs = [ObjectRef("bucket", f"{name}/{i}.png") for i in range(count)]
            scan, ids = create_scan(
                session, refs, origin="test", threshold=0.5, client_id=client.id, webhook_events=events
            )
            scans[scan.id] = ids
    # An image another run already failed: storing a result for it changes nothing.
    already_failed = scans[next(iter(scans))][0]
    with sessions.begin() as session:
        assert Scorer._finish(
            session, already_failed, state=FAILED, error_code="corrupt_image", error_message="x"
        )
    scores = {image_id: (i + 0.5) / len(ids) for ids in scans.values() for i, image_id in enumerate(ids)}
    published: list[uuid.UUID] = []
    scored_before = _scored("true") + _scored("false")

    # Every image stored twice, once by each "process", all at once: duplicates and scans shared.
    calls = [(n, image_id) for image_id in scores for n in (0, 1)]
    start = threading.Barrier(len(calls))
    with (
        Scorer(settings, detector, sessions=make_sessionmaker(engines[0]), on_outbox=published.extend) as one,
        Scorer(settings, detector, sessions=make_sessionmaker(engines[1]), on_outbox=published.extend) as two,
    ):
        scorers = (one, two)

        def store(call: tuple[int, uuid.UUID]):  # type: ignore[no-untyped-def]
            n, image_id = call
            start.wait()
            return scorers[n]._store(image_id, _result(scores[image_id]))

        with ThreadPoolExecutor(len(calls)) as pool:
            outcomes = list(pool.map(store, calls))

    by_image: dict[uuid.UUID, list[Any]] = {}
    for outcome in outcomes:
        by_image.setdefault(outcome.image_id, []).append(outcome)
    assert [(o.state, o.changed) for o in by_image[already_failed]] == [(FAILED, False)] * 2
    stored = [image_id for image_id in scores if image_id != already_failed]
    for image_id in stored:
        mine = by_image[image_id]
        assert sum(o.changed for o in mine) == 1
        assert {(o.state, o.score, o.flagged) for o in mine} == {
            (DONE, scores[image_id], scores[image_id] >= 0.5)
        }
    assert _scored("true") + _scored("false") - scored_before == len(stored)

    with sessions() as session:
        rows = {row.id: row for row in session.scalars(select(Image).where(Image.id.in_(stored)))}
        for image_id in stored:
            row = rows[image_id]
            assert (row.state, row.score, row.flagged) == (DONE, scores[image_id], scores[image_id] >= 0.5)
            assert (row.model_name, row.model_version) == (detector.name, detector.version)
            assert row.completed_at is not None
        for scan_id in scans:
            scan = session.get(Scan, scan_id)
            assert scan.pending_count == 0 and scan.completed_at is not None
        deliveries = session.scalars(select(WebhookDelivery).where(WebhookDelivery.scan_id.in_(scans))).all()
    completed = Counter(d.scan_id for d in deliveries if d.event_type == EVENT_SCAN_COMPLETED)
    assert completed == {scan_id: 1 for scan_id in scans}
    flagged = sorted(d.image_id for d in deliveries if d.event_type == EVENT_IMAGE_FLAGGED)
    assert flagged == sorted(i for i in stored if scores[i] >= 0.5)
    # Published after commit, each exactly once.
    assert sorted(published) == sorted(d.id for d in deliveries)

    # Fewer commits than results, and at least one transaction wrote several images.
    commits = sum(w.commits for w in watches)
    assert 0 < commits < len(calls)
    assert max(n for w in watches for n in w.images_per_write) > 1
    for engine in engines:
        engine.dispose()


def test_one_batch_writes_image_flagged_deliveries_exactly_where_a_webhook_would_go(settings_factory, pg_url) -> None:
    """Flagged results of scans with different routes, stored in one transaction."""
    settings = settings_factory(database_url=pg_url, batch_size=16)
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        hooked = create_client(session, "hooked", all_buckets=True, webhook_url="https://hooks.example/in").client.id
        silent = create_client(session, "silent", all_buckets=True).client.id
        routes = {  # scan -> whether its image.flagged events go anywhere
            "client webhook": (dict(client_id=hooked), True),
            "client webhook, events without image.flagged": (
                dict(client_id=hooked, webhook_events=[EVENT_SCAN_COMPLETED]),
                False,
            ),
            "no webhook anywhere": (dict(client_id=silent), False),
            "scan callback, client without webhook": (
                dict(client_id=silent, callback_url="https://cb.example/scan"),
                True,
            ),
            "no client": (dict(callback_url="https://cb.example/orphan"), False),
        }
        images: dict[uuid.UUID, bool] = {}
        scan_ids = []
        for name, (options, routed) in routes.items():
            refs = [ObjectRef("bucket", f"{name}/{i}.png") for i in range(2)]
            scan, ids = create_scan(session, refs, origin="test", threshold=0.5, **options)
            scan_ids.append(scan.id)
            images.update(dict.fromkeys(ids, routed))
    published: list[uuid.UUID] = []
    with Scorer(settings, Detector.from_settings(settings), sessions=sessions, on_outbox=published.extend) as scorer:
        outcomes = scorer._write_batch([(image_id, _result(0.9)) for image_id in images])
    assert {(o.state, o.flagged) for o in outcomes} == {(DONE, True)}
    with sessions() as session:
        deliveries = session.scalars(select(WebhookDelivery).where(WebhookDelivery.scan_id.in_(scan_ids))).all()
    flagged = sorted(d.image_id for d in deliveries if d.event_type == EVENT_IMAGE_FLAGGED)
    assert flagged == sorted(i for i, routed in images.items() if routed)
    # The batch completed the scans too: their scan.completed rows (where asked for) went out with the rest.
    assert sorted(published) == sorted(d.id for d in deliveries)
    engine.dispose()


@pytest.fixture
def local_copies(corpus_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Distinct local files (one image each), so that one scan holds several images."""

    def make(count: int) -> list[ObjectRef]:
        source = corpus_dir / "real" / "IMG_0003.jpg"
        refs = []
        for i in range(count):
            path = tmp_path / f"copy-{i}.jpg"
            shutil.copy(source, path)
            refs.append(ObjectRef(None, str(path)))
        return refs

    return make


def test_a_failed_batch_transaction_leaves_its_images_unstored_and_every_caller_retries(
    settings_factory, pg_url, local_copies
) -> None:
    count = 6
    # One forward batch, one writer batch: both fire when all six images are in.
    settings = settings_factory(database_url=pg_url, batch_size=count, batch_wait_ms=2000.0)
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    watch = WriterWatch(engine)
    with sessions.begin() as session:
        client = create_client(session, "hooks", all_buckets=True, webhook_url="https://hooks.example/in").client
        scan, ids = create_scan(
            session,
            local_copies(count),
            origin="test",
            threshold=0.0,  # every image flagged: an outbox row each, were anything committed
            client_id=client.id,
            webhook_events=[EVENT_IMAGE_FLAGGED, EVENT_SCAN_COMPLETED],
        )
        scan_id = scan.id

    # The database goes away in the middle of the batch: after its images were updated,
    # at the scan counter, the server ends the writer's connection.
    admin = make_engine(pg_url)
    armed = threading.Event()
    armed.set()

    def terminate(_conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if (
            armed.is_set()
            and threading.current_thread().name == WRITER_THREAD
            and statement.startswith("UPDATE scans")
        ):
            with admin.connect() as conn:
                conn.execute(
                    text("SELECT pg_terminate_backend(:pid, 5000)"),
                    {"pid": cursor.connection.info.backend_pid},
                )

    event.listen(engine, "before_cursor_execute", terminate)
    published: list[uuid.UUID] = []
    with Scorer(
        settings,
        Detector.from_settings(settings),
        sessions=sessions,
        allow_local=True,
        on_outbox=published.extend,
        store_wait_s=2.0,
    ) as scorer:

        def attempt(image_id: uuid.UUID) -> Exception | None:
            try:
                scorer.process_image(image_id)
            except Exception as exc:
                return exc
            return None

        with ThreadPoolExecutor(count) as pool:
            errors = list(pool.map(attempt, ids))
        assert all(isinstance(e, TransientError) and e.code == "database_unavailable" for e in errors), errors
        assert watch.images_per_write == [count]  # one transaction held them all, and it failed
        assert watch.commits == 0

        with sessions() as session:
            rows = session.scalars(select(Image).where(Image.scan_id == scan_id)).all()
            assert {(r.state, r.score, r.completed_at) for r in rows} == {(PROCESSING, None, None)}
            scan = session.get(Scan, scan_id)
            assert (scan.pending_count, scan.completed_at) == (count, None)
            assert session.scalar(select(func.count()).where(WebhookDelivery.scan_id == scan_id)) == 0
        assert published == []

        # The retry the broker would make: everything is stored, the scan completes once.
        armed.clear()
        with ThreadPoolExecutor(count) as pool:
            outcomes = list(pool.map(scorer.process_image, ids))
    assert {(o.state, o.changed, o.flagged) for o in outcomes} == {(DONE, True, True)}
    with sessions() as session:
        scan = session.get(Scan, scan_id)
        assert scan.pending_count == 0 and scan.completed_at is not None
        kinds = Counter(
            session.scalars(select(WebhookDelivery.event_type).where(WebhookDelivery.scan_id == scan_id))
        )
    assert kinds == {EVENT_IMAGE_FLAGGED: count, EVENT_SCAN_COMPLETED: 1}
    assert len(published) == count + 1
    engine.dispose()
    admin.dispose()


def test_a_result_the_database_refuses_fails_only_its_own_caller(settings_factory, pg_url) -> None:
    settings = settings_factory(database_url=pg_url, batch_size=4)
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    watch = WriterWatch(engine)
    with sessions.begin() as session:
        scan, ids = create_scan(
            session, [ObjectRef("bucket", f"{i}.png") for i in range(4)], origin="test", threshold=0.5
        )
        scan_id = scan.id
    bad = ids[2]
    start = threading.Barrier(len(ids))
    with Scorer(settings, Detector.from_settings(settings), sessions=sessions, store_wait_s=2.0) as scorer:

        def store(image_id: uuid.UUID) -> Any:
            start.wait()
            # images.format is VARCHAR(16): this one value fails its statement.
            result = _result(0.25, fmt="x" * 40 if image_id == bad else "png")
            try:
                return scorer._store(image_id, result)
            except Exception as exc:
                return exc

        with ThreadPoolExecutor(len(ids)) as pool:
            answers = dict(zip(ids, pool.map(store, ids), strict=True))
    assert isinstance(answers[bad], DataError)
    assert all(answers[i].state == DONE and answers[i].changed for i in ids if i != bad)
    # The batch of four failed, then each was written alone.
    assert watch.images_per_write[0] == len(ids) and watch.commits == len(ids) - 1
    with sessions() as session:
        states = dict(session.execute(select(Image.id, Image.state).where(Image.scan_id == scan_id)).all())
        assert states == {i: (QUEUED if i == bad else DONE) for i in ids}
        assert session.get(Scan, scan_id).pending_count == 1
    engine.dispose()
