"""The queue service's guarantees, against real processes: ``synthguard worker`` and
``synthguard beat`` subprocesses, Redis, PostgreSQL and the moto S3 server.

Each test synchronises on what a user can observe (rows in PostgreSQL, messages
in Redis, lines a worker logs), never on sleeps.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from conftest import BAD_FIXTURES, FlakyS3, good_fixture_files, image_rows, image_states, wait_until
from worker.models import DONE, FAILED, PROCESSING, QUEUED, Image, Scan
from worker.preparing import usable_cores
from worker.queueing import enqueue, publish

SMALL_IMAGE = "real/earth_apollo17.jpg"


def _all_terminal(sessions, ids: list[uuid.UUID]) -> bool:  # type: ignore[no-untyped-def]
    states = image_states(sessions, ids)
    return states.get(DONE, 0) + states.get(FAILED, 0) == len(ids)


def _upload_copies(s3_client, bucket: str, corpus_dir: Path, n: int, prefix: str = "img") -> list[str]:  # type: ignore[no-untyped-def]
    body = (corpus_dir / SMALL_IMAGE).read_bytes()
    keys = [f"{prefix}/{i:05d}.jpg" for i in range(n)]
    for key in keys:
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    return keys


def _enqueue(service_settings, celery_app, bucket: str, keys: list[str], priority: str = "realtime"):  # type: ignore[no-untyped-def]
    return enqueue(
        [(bucket, key) for key in keys], priority=priority, settings=service_settings, app=celery_app
    )


# ------------------------------------------------------------------- end to end


@pytest.mark.parametrize("prepare_processes", [0, 2], ids=["prepared-in-threads", "prepared-in-processes"])
def test_every_fixture_folder_through_a_real_worker(
    fixtures_dir, s3_client, bucket, service_settings, celery_app, start_service, sessions, prepare_processes
) -> None:
    keys: dict[str, str] = {}
    for path in [*good_fixture_files(fixtures_dir), *(fixtures_dir / "bad" / name for name in BAD_FIXTURES)]:
        key = f"{path.parent.name}/{path.name}"
        s3_client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        keys[key] = BAD_FIXTURES.get(path.name, "")
    worker = start_service("worker", prepare_processes=prepare_processes)
    assert ("in 2 preparing processes" in worker.log()) == (prepare_processes == 2)
    queued = _enqueue(service_settings, celery_app, bucket, list(keys))
    wait_until(lambda: _all_terminal(sessions, queued.image_ids), message="every image terminal")
    rows = image_rows(sessions, queued.image_ids)
    for row in rows.values():
        expected_error = keys[row.key]
        if expected_error:
            assert (row.state, row.error_code) == (FAILED, expected_error), row.key
        else:
            assert row.state == DONE, (row.key, row.error_message)
            assert 0.0 <= row.score <= 1.0 and row.model_version.startswith("sha256:")
            assert row.etag and row.sha256
    with sessions() as session:
        assert session.get(Scan, queued.scan_id).completed_at is not None


# ------------------------------------------------------------------ guarantees


def test_a_worker_killed_with_images_in_flight_loses_nothing(
    corpus_dir, s3_client, s3_endpoint, bucket, service_settings, celery_app, start_service, sessions
) -> None:
    keys = _upload_copies(s3_client, bucket, corpus_dir, 6)
    # Every claimed image is held at its fetch, so the kill lands with all six in flight (realtime
    # images do not wait for a batch to fill: without the hold, six at once would be a race).
    proxy = FlakyS3(s3_endpoint, {}, holds=("img/",))
    try:
        doomed = start_service("worker", concurrency=6, s3_endpoint_url=proxy.url)
        queued = _enqueue(service_settings, celery_app, bucket, keys)
        wait_until(lambda: image_states(sessions, queued.image_ids).get(PROCESSING) == 6, message="all claimed")
        doomed.signal(signal.SIGKILL)
        doomed.wait()
    finally:
        proxy.close()
    assert image_states(sessions, queued.image_ids) == {PROCESSING: 6}

    start_service("worker", stale_after_s=1)
    start_service("beat", stale_after_s=1, sweep_interval_s=0.5)
    wait_until(lambda: _all_terminal(sessions, queued.image_ids), message="recovery after SIGKILL")
    rows = image_rows(sessions, queued.image_ids).values()
    assert {row.state for row in rows} == {DONE}
    assert all(row.attempts >= 2 for row in rows)  # the lost attempt is on record


def test_redelivered_messages_leave_one_result(
    corpus_dir, s3_client, bucket, service_settings, celery_app, start_service, sessions
) -> None:
    keys = _upload_copies(s3_client, bucket, corpus_dir, 3)
    worker = start_service("worker")
    queued = _enqueue(service_settings, celery_app, bucket, keys)
    wait_until(lambda: _all_terminal(sessions, queued.image_ids), message="first results")
    before = {i: (r.score, r.completed_at, r.attempts, r.state) for i, r in image_rows(sessions, queued.image_ids).items()}

    publish(celery_app, queued.image_ids * 2, "realtime")  # every message delivered twice more
    wait_until(lambda: worker.log().count("succeeded in") >= 9, message="nine task runs")
    after = {i: (r.score, r.completed_at, r.attempts, r.state) for i, r in image_rows(sessions, queued.image_ids).items()}
    assert after == before
    with sessions() as session:
        assert session.scalar(select(func.count()).where(Image.scan_id == queued.scan_id)) == 3


@pytest.fixture
def flaky_s3(s3_endpoint: str) -> Iterator[FlakyS3]:
    proxy = FlakyS3(s3_endpoint, {"flaky": 2, "always": -1})
    yield proxy
    proxy.close()


def test_transient_errors_retry_and_permanent_ones_fail_at_once(
    corpus_dir, s3_client, bucket, service_settings, celery_app, start_service, sessions, flaky_s3
) -> None:
    body = (corpus_dir / SMALL_IMAGE).read_bytes()
    for key in ("flaky.jpg", "always.jpg", "steady.jpg"):
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    # No retries inside botocore: each 503 is one attempt of ours.
    start_service("worker", env={"AWS_MAX_ATTEMPTS": "1"}, s3_endpoint_url=flaky_s3.url, max_attempts=4)
    queued = _enqueue(service_settings, celery_app, bucket, ["flaky.jpg", "always.jpg", "steady.jpg", "missing.jpg"])
    wait_until(lambda: _all_terminal(sessions, queued.image_ids), message="all terminal")
    rows = {r.key: r for r in image_rows(sessions, queued.image_ids).values()}
    assert rows["steady.jpg"].state == DONE and rows["steady.jpg"].attempts == 1
    assert rows["flaky.jpg"].state == DONE and rows["flaky.jpg"].attempts == 3
    assert (rows["always.jpg"].state, rows["always.jpg"].error_code) == (FAILED, "storage_unavailable")
    assert rows["always.jpg"].attempts == 4
    assert (rows["missing.jpg"].state, rows["missing.jpg"].error_code) == (FAILED, "object_not_found")
    assert rows["missing.jpg"].attempts == 1


# SIGTERM goes to the worker's whole process group (as a service manager's stop may), its
# preparing processes and their fork server included: the worker still stores the images in
# flight and exits cleanly. Their fetches are held until the signal has gone out, so that all
# three threads are mid-image when it lands (realtime images do not wait for a batch to fill,
# so without the hold the moment three are in flight at once is a race).
@pytest.mark.parametrize("prepare_processes", [0, 2], ids=["prepared-in-threads", "prepared-in-processes"])
def test_sigterm_finishes_the_batch_in_flight_and_keeps_the_rest(
    corpus_dir, s3_client, s3_endpoint, bucket, service_settings, celery_app, start_service, sessions, redis_url,
    prepare_processes,
) -> None:
    keys = _upload_copies(s3_client, bucket, corpus_dir, 9)
    proxy = FlakyS3(s3_endpoint, {}, holds=("img/",))
    try:
        worker = start_service(
            "worker", concurrency=3, prepare_processes=prepare_processes, s3_endpoint_url=proxy.url
        )
        queued = _enqueue(service_settings, celery_app, bucket, keys)
        wait_until(lambda: image_states(sessions, queued.image_ids).get(PROCESSING) == 3, message="three in flight")
        worker.signal(signal.SIGTERM)
        proxy.release()
        assert worker.wait(60) == 0
    finally:
        proxy.close()
    states = image_states(sessions, queued.image_ids)
    assert states == {DONE: 3, QUEUED: 6}  # the batch in flight was stored, nothing half-done
    assert redis.Redis.from_url(redis_url).llen("synthguard.realtime") == 6  # prefetched ones went back

    start_service("worker")  # no sweeper: the messages themselves were kept
    wait_until(lambda: _all_terminal(sessions, queued.image_ids), message="the rest after restart")
    assert image_states(sessions, queued.image_ids) == {DONE: 9}


def test_a_bulk_backlog_does_not_delay_realtime_images(
    corpus_dir, s3_client, bucket, service_settings, celery_app, start_service, sessions
) -> None:
    keys = _upload_copies(s3_client, bucket, corpus_dir, 120, prefix="backfill")
    bulk = _enqueue(service_settings, celery_app, bucket, keys, priority="bulk")
    realtime = _enqueue(service_settings, celery_app, bucket, keys[:1], priority="realtime")
    start_service("worker", batch_size=8, concurrency=8)
    wait_until(lambda: _all_terminal(sessions, realtime.image_ids), message="the realtime image")
    (rt,) = image_rows(sessions, realtime.image_ids).values()
    with sessions() as session:
        ahead = session.scalar(
            select(func.count()).where(Image.scan_id == bulk.scan_id, Image.completed_at < rt.completed_at)
        )
    # At most the bulk work already in flight when it arrived: a batch or two, not the backlog.
    assert ahead <= 2 * 8, ahead


def test_workers_dedicated_to_lanes_by_their_short_names(
    corpus_dir, s3_client, bucket, service_settings, celery_app, start_service, sessions, redis_url
) -> None:
    keys = _upload_copies(s3_client, bucket, corpus_dir, 12, prefix="lanes")
    bulk = _enqueue(service_settings, celery_app, bucket, keys[:10], priority="bulk")
    realtime = _enqueue(service_settings, celery_app, bucket, keys[10:], priority="realtime")
    start_service("worker", args=("--queues=realtime,webhooks",))
    wait_until(lambda: _all_terminal(sessions, realtime.image_ids), message="the realtime images")
    # The realtime worker leaves the backlog alone: every bulk message is still on its queue.
    assert redis.Redis.from_url(redis_url).llen("synthguard.bulk") == -(-10 // service_settings.bulk_chunk)
    assert image_states(sessions, bulk.image_ids) == {QUEUED: 10}
    start_service("worker", args=("--queues=bulk", "--hostname=bulk@%h"))
    wait_until(lambda: _all_terminal(sessions, bulk.image_ids), message="the backfill")
    assert image_states(sessions, bulk.image_ids + realtime.image_ids) == {DONE: 12}


def test_a_worker_refuses_an_unknown_queue_before_loading_anything(service_env) -> None:
    from click.testing import CliRunner

    from worker.cli import main

    result = CliRunner().invoke(main, ["worker", "--queues", "realtime,bluk"], env=service_env)
    assert result.exit_code == 2
    assert "unknown queue 'bluk'" in result.output and "realtime, webhooks, overflow, bulk" in result.output


def test_the_sweeper_republishes_only_stale_queue_work_to_its_lane(
    service_settings, celery_app, sessions, redis_url
) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from worker.intake import create_scan
    from worker.models import utcnow
    from worker.queueing import sweep_stale
    from worker.storage import ObjectRef

    with sessions.begin() as session:
        _, bulk_ids = create_scan(session, [ObjectRef("b1", "a.jpg")], origin="api", threshold=0.5, priority="bulk")
        _, rt_ids = create_scan(session, [ObjectRef("b1", "b.jpg")], origin="api", threshold=0.5)
        create_scan(session, [ObjectRef("b1", "c.jpg")], origin="api", threshold=0.5)
        _, cli_ids = create_scan(session, [ObjectRef(None, "/tmp/x.jpg")], origin="cli", threshold=0.5)
        old = utcnow() - timedelta(days=2)
        session.execute(update(Image).where(Image.id.in_(bulk_ids + rt_ids + cli_ids)).values(updated_at=old))
    # Stale means older than a day: images earlier tests of this session left queued (a backlog
    # test stops at its realtime image) are minutes old, and must not count here.
    stale_after_s = 24 * 3600.0
    assert sweep_stale(sessions, celery_app, stale_after_s=stale_after_s) == 2
    broker = redis.Redis.from_url(redis_url)
    assert (broker.llen("synthguard.bulk"), broker.llen("synthguard.realtime")) == (1, 1)
    # Touched: the next sweep leaves them alone until they are stale again.
    assert sweep_stale(sessions, celery_app, stale_after_s=stale_after_s) == 0


def test_a_queue_worker_never_reads_local_files(corpus_dir, settings_factory, pg_url, sessions) -> None:
    from worker.detector import Detector
    from worker.intake import create_scan
    from worker.scoring import Scorer
    from worker.storage import ObjectRef

    settings = settings_factory(database_url=pg_url)
    with sessions.begin() as session:
        _, (image_id,) = create_scan(
            session, [ObjectRef(None, str(corpus_dir / SMALL_IMAGE))], origin="api", threshold=0.5
        )
    with Scorer(settings, Detector.from_settings(settings), sessions=sessions) as scorer:
        outcome = scorer.process_image(image_id)
    assert (outcome.state, outcome.error_code) == (FAILED, "access_denied")


def test_api_to_worker_to_results_with_client_isolation(
    corpus_dir, s3_client, bucket, service_settings, celery_app, start_service, sessions
) -> None:
    """The whole path: HTTP API -> PostgreSQL -> Redis -> worker -> S3 -> PostgreSQL -> HTTP API."""
    from fastapi.testclient import TestClient

    from api_stub.app import create_app
    from worker.clients import create_client

    with sessions.begin() as session:
        alice, bob = (create_client(session, name, all_buckets=True).api_key for name in ("alice", "bob"))
    objects = []
    for path in [*(corpus_dir / "real").iterdir(), corpus_dir / "bad" / "truncated.jpg"]:
        key = f"api/{path.name}"
        s3_client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        objects.append({"bucket": bucket, "key": key})
    s3_client.put_object(Bucket=bucket, Key="events/new upload.png", Body=(corpus_dir / "formats" / "sample1.png").read_bytes())
    start_service("worker")

    as_alice = {"Authorization": f"Bearer {alice}"}
    with TestClient(create_app(service_settings, celery=celery_app)) as http:
        accepted = http.post("/v1/scans", json={"objects": objects, "metadata": {"ticket": 7}}, headers=as_alice)
        assert accepted.status_code == 202, accepted.text
        scan_url = f"/v1/scans/{accepted.json()['id']}"
        event = {
            "Records": [
                {
                    "eventName": "ObjectCreated:Put",
                    "s3": {"bucket": {"name": bucket}, "object": {"key": "events/new+upload.png", "sequencer": "01"}},
                }
            ]
        }
        (event_image,) = http.post("/v1/s3-events", json=event, headers=as_alice).json()["images"]

        done = wait_until(
            lambda: (doc := http.get(scan_url, headers=as_alice).json())["state"] == "completed" and doc,
            message="the scan completed",
        )
        by_key = {image["key"]: image for image in done["images"]}
        assert by_key["api/truncated.jpg"]["error_code"] == "corrupt_image"
        for name in ("IMG_0003.jpg", "P1000827.jpg", "earth_apollo17.jpg"):
            assert by_key[f"api/{name}"]["state"] == "done" and 0 <= by_key[f"api/{name}"]["score"] <= 1
        assert done["counts"]["done"] == 3 and done["counts"]["failed"] == 1

        image_url = f"/v1/images/{event_image['id']}"
        scored = wait_until(
            lambda: (doc := http.get(image_url, headers=as_alice).json())["state"] == "done" and doc,
            message="the S3 event's image scored",
        )
        assert scored["key"] == "events/new upload.png"

        as_bob = {"Authorization": f"Bearer {bob}"}
        assert http.get(scan_url, headers=as_bob).status_code == 404
        assert http.get(image_url, headers=as_bob).status_code == 404


def test_models_lists_what_each_worker_has_loaded_and_the_stored_versions(
    corpus_dir, s3_client, bucket, service_settings, service_env, celery_app, start_service, sessions, checkpoint
) -> None:
    import hashlib
    import json

    from click.testing import CliRunner

    from worker.cli import main

    version = "sha256:" + hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12]
    keys = _upload_copies(s3_client, bucket, corpus_dir, 2)
    start_service("worker")
    queued = _enqueue(service_settings, celery_app, bucket, keys)
    wait_until(lambda: _all_terminal(sessions, queued.image_ids), message="scores stored")

    result = CliRunner().invoke(main, ["models", "--json", "--timeout", "5"], env=service_env)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (answer,) = doc["workers"]
    assert (answer["name"], answer["version"], answer["device"]) == ("tf_mobilenetv3_large_100", version, "cpu")
    assert answer["precision"] == "float32" and answer["frozen"] is True  # the CPU default: frozen graph
    assert answer["prepare_processes"] == usable_cores()  # auto: one preparing process per core
    stored = {v["version"]: v["scores"] for v in doc["stored_versions"]}
    assert stored[version] >= 2
