"""Bulk messages carry chunks of image ids (issue 20): one statement claims a chunk, one
transaction stores it, every image still ends on its own, a chunk makes room for realtime
work, and a worker killed mid-chunk redoes only what it had not stored.

The images are made here; real PostgreSQL, the moto S3 server, Redis and worker processes.
"""

from __future__ import annotations

import io
import signal
import threading
import uuid
from collections.abc import Iterator

import pytest
import redis
from PIL import Image as PILImage
from sqlalchemy import event, func, select

from conftest import FlakyS3, image_rows, image_states, wait_until
from worker.db import ensure_schema, make_engine, make_sessionmaker
from worker.detector import Detector
from worker.intake import create_scan
from worker.models import DONE, FAILED, PROCESSING, QUEUED, Image
from worker.priority import BulkSlots, WaitingProbe
from worker.queueing import enqueue
from worker.scoring import Scorer
from worker.storage import ObjectRef


def _jpeg(seed: int, size: int = 96) -> bytes:
    out = io.BytesIO()
    image = PILImage.new("RGB", (size, size), (seed * 37 % 256, seed * 91 % 256, 160))
    image.putpixel((seed % size, 0), (255, 255, 255))  # distinct bytes per seed
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def _upload(s3_client, bucket: str, n: int, prefix: str = "img") -> list[str]:  # type: ignore[no-untyped-def]
    keys = [f"{prefix}/{i:05d}.jpg" for i in range(n)]
    for i, key in enumerate(keys):
        s3_client.put_object(Bucket=bucket, Key=key, Body=_jpeg(i))
    return keys


@pytest.fixture
def engine(pg_url: str) -> Iterator[object]:
    engine = make_engine(pg_url)
    ensure_schema(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def scorer_for(settings_factory, engine, s3_endpoint):  # type: ignore[no-untyped-def]
    """A Scorer on the test database, fetching through ``endpoint`` (the S3 server by default)."""
    made: list[Scorer] = []

    def build(endpoint: str = s3_endpoint, **overrides: object) -> Scorer:
        settings = settings_factory(
            database_url=str(engine.url), s3_endpoint_url=endpoint, prepare_processes=0, **overrides
        )
        scorer = Scorer(settings, Detector.from_settings(settings), sessions=make_sessionmaker(engine))
        made.append(scorer)
        return scorer

    yield build
    for scorer in made:
        scorer.close()


def _queue(sessions, bucket: str, keys: list[str]) -> list[uuid.UUID]:  # type: ignore[no-untyped-def]
    with sessions.begin() as session:
        _, ids = create_scan(
            session, [ObjectRef(bucket, key) for key in keys], origin="api", threshold=0.5, priority="bulk"
        )
    return ids


# ------------------------------------------------------------------ the engine


def test_a_chunk_is_claimed_by_one_statement_and_stored_by_one(
    s3_client, bucket, engine, scorer_for
) -> None:
    sessions = make_sessionmaker(engine)
    ids = _queue(sessions, bucket, _upload(s3_client, bucket, 6))
    scorer = scorer_for()
    updates: list[str] = []

    def seen(conn, cursor, statement: str, *args: object) -> None:  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("UPDATE IMAGES"):
            updates.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        report = scorer.process_chunk(ids)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert (report.done, report.failed, report.unchanged, report.retry, report.handed_back) == (6, 0, 0, [], [])
    assert len(updates) == 2, updates  # the claim, and the store of all six
    rows = image_rows(sessions, ids)
    assert {(row.state, row.attempts) for row in rows.values()} == {(DONE, 1)}
    assert len({row.sha256 for row in rows.values()}) == 6


def test_each_image_of_a_chunk_ends_on_its_own(s3_client, bucket, engine, scorer_for) -> None:
    sessions = make_sessionmaker(engine)
    keys = _upload(s3_client, bucket, 3)
    s3_client.put_object(Bucket=bucket, Key="broken.jpg", Body=_jpeg(7)[:200] + b"\x00" * 64)
    ids = _queue(sessions, bucket, [*keys, "broken.jpg", "missing.jpg"])
    scorer = scorer_for()
    assert scorer.process_image(ids[0]).state == DONE  # already done: a redelivered chunk leaves it alone
    before = image_rows(sessions, ids[:1])[ids[0]]
    stranger = uuid.uuid4()  # not in the database
    report = scorer.process_chunk([*ids, ids[1], stranger])  # ids[1] twice: scored once
    assert (report.done, report.failed, report.unchanged) == (2, 2, 2)
    rows = image_rows(sessions, ids)
    assert (rows[ids[0]].completed_at, rows[ids[0]].score) == (before.completed_at, before.score)
    assert [rows[i].state for i in ids] == [DONE, DONE, DONE, FAILED, FAILED]
    assert (rows[ids[3]].error_code, rows[ids[4]].error_code) == ("corrupt_image", "object_not_found")
    assert [rows[i].attempts for i in ids] == [1, 1, 1, 1, 1]


def test_realtime_work_waiting_hands_the_rest_of_a_chunk_back_uncounted(
    s3_client, bucket, engine, scorer_for
) -> None:
    sessions = make_sessionmaker(engine)
    ids = _queue(sessions, bucket, _upload(s3_client, bucket, 4))
    scorer = scorer_for()
    asked: list[int] = []

    def realtime_waits() -> bool:
        asked.append(len(asked))
        return True

    report = scorer.process_chunk(ids, should_yield=realtime_waits)
    assert asked == [0]  # asked between images, never before the first
    assert report.handed_back == ids[1:]
    # The first image's result went to the writer; the thread did not wait for its commit.
    assert [future.result(timeout=60).state for future in report.storing] == [DONE]
    rows = image_rows(sessions, ids)
    assert (rows[ids[0]].state, rows[ids[0]].attempts) == (DONE, 1)
    # Back in the queue as if never claimed: handing back does not use up attempts.
    assert {(rows[i].state, rows[i].attempts) for i in ids[1:]} == {(QUEUED, 0)}
    again = scorer.process_chunk(report.handed_back)
    assert again.done == 3
    assert {(row.state, row.attempts) for row in image_rows(sessions, ids).values()} == {(DONE, 1)}


def test_a_transient_error_in_a_chunk_retries_that_image_alone(
    s3_client, s3_endpoint, bucket, engine, scorer_for, monkeypatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # each 503 is one attempt of ours
    proxy = FlakyS3(s3_endpoint, {"flaky": -1})
    try:
        sessions = make_sessionmaker(engine)
        keys = _upload(s3_client, bucket, 2)
        s3_client.put_object(Bucket=bucket, Key="flaky.jpg", Body=_jpeg(9))
        ids = _queue(sessions, bucket, [keys[0], "flaky.jpg", keys[1]])
        report = scorer_for(proxy.url, max_attempts=3).process_chunk(ids)
    finally:
        proxy.close()
    assert report.done == 2 and report.retry == [(ids[1], 1, "storage_unavailable")]
    flaky = image_rows(sessions, ids)[ids[1]]
    assert (flaky.state, flaky.attempts) == (QUEUED, 1)
    assert flaky.error_message.startswith("retrying after storage_unavailable")


def test_the_waiting_probe_asks_the_broker_once_per_interval_for_all_threads() -> None:
    answers = iter([3, 0])
    calls: list[int] = []

    def probe() -> int:
        calls.append(1)
        return next(answers)

    waiting = WaitingProbe(probe, interval_s=3600.0)
    start = threading.Barrier(8)

    def ask() -> int:
        start.wait()
        return waiting()

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(ask())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Messages waiting are heard by one thread, not all eight.
    assert sorted(results) == [0] * 7 + [3] and len(calls) == 1

    def broken() -> int:
        raise ConnectionError("broker away")

    assert WaitingProbe(broken, interval_s=0.0)() == 0  # the chunk goes on


def test_a_chunk_beyond_the_bulk_slots_stands_by_until_a_slot_frees_or_it_gives_up() -> None:
    slots = BulkSlots(1)
    assert slots.acquire(lambda: True, 0.001)  # a free slot is taken without asking
    asked = threading.Event()
    realtime_waits = threading.Event()
    outcome: list[bool] = []

    def give_up() -> bool:
        asked.set()
        return realtime_waits.is_set()

    def stand_by() -> None:
        outcome.append(slots.acquire(give_up, 0.001))

    waiting = threading.Thread(target=stand_by)
    waiting.start()
    asked.wait(5)
    assert slots.standing_by == 1 and not outcome
    realtime_waits.set()
    waiting.join(5)
    assert outcome == [False] and slots.standing_by == 0  # given back; the slot is still busy

    asked.clear()
    realtime_waits.clear()
    waiting = threading.Thread(target=stand_by)
    waiting.start()
    asked.wait(5)
    slots.release()
    waiting.join(5)
    assert outcome == [False, True] and slots.standing_by == 0  # took the slot that freed
    with pytest.raises(ValueError):
        BulkSlots(0)


# ------------------------------------------------------------- through workers


def _enqueue(service_settings, celery_app, bucket: str, keys: list[str], priority: str):  # type: ignore[no-untyped-def]
    return enqueue([(bucket, key) for key in keys], priority=priority, settings=service_settings, app=celery_app)


def test_bulk_images_are_published_in_chunks_and_realtime_ones_alone(s3_client, bucket, service_settings, celery_app, broker) -> None:
    keys = _upload(s3_client, bucket, 7)
    settings = service_settings.model_copy(update={"bulk_chunk": 3})
    _enqueue(settings, celery_app, bucket, keys, "bulk")
    assert broker.llen("synthguard.bulk") == 3  # 3 + 3 + 1
    _enqueue(settings, celery_app, bucket, keys[:2], "realtime")
    assert broker.llen("synthguard.realtime") == 2  # realtime: one image per message


def test_a_worker_killed_mid_chunk_redoes_only_what_it_had_not_stored(
    s3_client, s3_endpoint, bucket, service_settings, celery_app, start_service, sessions
) -> None:
    keys = _upload(s3_client, bucket, 6)
    proxy = FlakyS3(s3_endpoint, {}, holds=("held",))
    try:
        s3_client.put_object(Bucket=bucket, Key="held.jpg", Body=_jpeg(11))
        # Two chunks of three; one thread takes them in order. The second stops at held.jpg.
        order = [*keys[:3], keys[3], "held.jpg", keys[4]]
        settings = service_settings.model_copy(update={"bulk_chunk": 3})
        queued = _enqueue(settings, celery_app, bucket, order, "bulk")
        first, second = queued.image_ids[:3], queued.image_ids[3:]
        doomed = start_service("worker", concurrency=1, prepare_processes=0, s3_endpoint_url=proxy.url)
        wait_until(lambda: proxy.held.is_set(), message="the second chunk at its held image")
        assert image_states(sessions, first) == {DONE: 3}
        assert image_states(sessions, second) == {PROCESSING: 3}
        stored = {i: (r.completed_at, r.score) for i, r in image_rows(sessions, first).items()}
        doomed.signal(signal.SIGKILL)
        doomed.wait()
        proxy.release()

        start_service("worker", stale_after_s=1, s3_endpoint_url=proxy.url)
        start_service("beat", stale_after_s=1, sweep_interval_s=0.5)
        wait_until(lambda: image_states(sessions, second) == {DONE: 3}, message="recovery after SIGKILL")
    finally:
        proxy.close()
    rows = image_rows(sessions, queued.image_ids)
    # What was stored before the kill was not redone; the rest ran again.
    assert {i: (rows[i].completed_at, rows[i].score) for i in first} == stored
    assert [rows[i].attempts for i in first] == [1, 1, 1]
    assert [rows[i].attempts for i in second] == [2, 2, 2]


def test_flushing_redis_loses_no_chunked_image(
    s3_client, bucket, service_settings, celery_app, start_service, sessions, broker
) -> None:
    keys = _upload(s3_client, bucket, 5)
    settings = service_settings.model_copy(update={"bulk_chunk": 2})
    queued = _enqueue(settings, celery_app, bucket, keys, "bulk")
    assert broker.llen("synthguard.bulk") == 3
    broker.flushdb()  # Redis restarted without persistence: every message is gone
    start_service("worker", bulk_chunk=2)
    start_service("beat", stale_after_s=1, sweep_interval_s=0.5, bulk_chunk=2)
    wait_until(lambda: image_states(sessions, queued.image_ids) == {DONE: 5}, message="recovery after FLUSHDB")


def test_a_realtime_image_takes_the_thread_of_a_running_chunk(
    s3_client, bucket, service_settings, celery_app, start_service, sessions
) -> None:
    keys = _upload(s3_client, bucket, 64, prefix="backfill")
    settings = service_settings.model_copy(update={"bulk_chunk": 64})
    backfill = _enqueue(settings, celery_app, bucket, keys, "bulk")
    # One thread, one chunk of 64: without handing back, the upload would wait for all of it.
    start_service("worker", concurrency=1, prepare_processes=0, bulk_chunk=64)
    wait_until(lambda: image_states(sessions, backfill.image_ids).get(PROCESSING), message="the chunk claimed")
    upload = _enqueue(service_settings, celery_app, bucket, ["backfill/00000.jpg"], "realtime")
    wait_until(lambda: image_states(sessions, upload.image_ids) == {DONE: 1}, message="the realtime image")
    (done,) = image_rows(sessions, upload.image_ids).values()
    with sessions() as session:
        ahead = session.scalar(
            select(func.count()).where(Image.id.in_(backfill.image_ids), Image.completed_at < done.completed_at)
        )
    # The chunk's results so far are stored when it hands back; most of it still waits.
    assert ahead < 32, ahead
    wait_until(lambda: image_states(sessions, backfill.image_ids) == {DONE: 64}, message="the rest of the backfill")
    assert {row.attempts for row in image_rows(sessions, backfill.image_ids).values()} == {1}


def test_a_thread_standing_by_gives_its_chunk_back_for_a_realtime_image(
    s3_client, s3_endpoint, bucket, service_settings, celery_app, start_service, sessions, broker
) -> None:
    keys = _upload(s3_client, bucket, 4, prefix="backfill")
    s3_client.put_object(Bucket=bucket, Key="upload.jpg", Body=_jpeg(21))
    proxy = FlakyS3(s3_endpoint, {}, holds=("backfill",))
    try:
        settings = service_settings.model_copy(update={"bulk_chunk": 2})
        backfill = _enqueue(settings, celery_app, bucket, keys, "bulk").image_ids
        chunks = (backfill[:2], backfill[2:])
        # Two threads: one scores a chunk and is held at its first GET; the other holds the other chunk
        # unclaimed (SYNTHGUARD_REALTIME_STANDBY=1).
        start_service("worker", concurrency=2, prepare_processes=0, realtime_standby=1, s3_endpoint_url=proxy.url)
        wait_until(lambda: proxy.held.is_set() and broker.llen("synthguard.bulk") == 0, message="both chunks taken")
        upload = _enqueue(service_settings, celery_app, bucket, ["upload.jpg"], "realtime")
        wait_until(lambda: image_states(sessions, upload.image_ids) == {DONE: 1}, message="the realtime image")
        # Scored while the bulk thread was still inside its image; the other chunk was never claimed.
        states = sorted((image_states(sessions, chunk) for chunk in chunks), key=lambda s: PROCESSING in s)
        assert states == [{QUEUED: 2}, {PROCESSING: 2}]
        assert sum(row.attempts for row in image_rows(sessions, backfill).values()) == 2
        proxy.release()
        wait_until(lambda: image_states(sessions, backfill) == {DONE: 4}, message="the backfill")
    finally:
        proxy.close()
    assert {row.attempts for row in image_rows(sessions, backfill).values()} == {1}


def test_a_bulk_worker_does_not_hand_back_for_realtime_work_it_does_not_take(
    s3_client, bucket, service_settings, celery_app, start_service, sessions, redis_url
) -> None:
    keys = _upload(s3_client, bucket, 8)
    settings = service_settings.model_copy(update={"bulk_chunk": 8})
    # A realtime message waits the whole time, but this worker consumes bulk only.
    _enqueue(service_settings, celery_app, bucket, keys[:1], "realtime")
    backfill = _enqueue(settings, celery_app, bucket, keys, "bulk")
    worker = start_service("worker", args=("--queues=bulk",), concurrency=1, prepare_processes=0)
    wait_until(lambda: image_states(sessions, backfill.image_ids) == {DONE: 8}, message="the chunk")
    wait_until(lambda: "handed_back=" in worker.log(), message="the chunk's report")
    assert "handed_back=0" in worker.log() and "handed_back=1" not in worker.log()
    assert redis.Redis.from_url(redis_url).llen("synthguard.realtime") == 1


def test_sigterm_mid_chunk_stores_what_it_has_and_puts_the_rest_back(
    s3_client, bucket, service_settings, celery_app, start_service, sessions, broker
) -> None:
    keys = _upload(s3_client, bucket, 64)
    settings = service_settings.model_copy(update={"bulk_chunk": 64})
    backfill = _enqueue(settings, celery_app, bucket, keys, "bulk")
    worker = start_service("worker", concurrency=1, prepare_processes=0)
    wait_until(lambda: image_states(sessions, backfill.image_ids) == {PROCESSING: 64}, message="the chunk claimed")
    worker.signal(signal.SIGTERM)
    assert worker.wait(60) == 0
    states = image_states(sessions, backfill.image_ids)
    # Stopped after the image in hand, not after the whole chunk; nothing left half-done.
    assert set(states) == {DONE, QUEUED} and states[DONE] < 32, states
    assert broker.llen("synthguard.bulk") == 1  # the rest, as one chunk
    rest = [row for row in image_rows(sessions, backfill.image_ids).values() if row.state == QUEUED]
    assert {row.attempts for row in rest} == {0}

    start_service("worker")
    wait_until(lambda: image_states(sessions, backfill.image_ids) == {DONE: 64}, message="the rest after restart")
    assert {row.attempts for row in image_rows(sessions, backfill.image_ids).values()} == {1}
