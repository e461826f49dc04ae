"""The producer commands as a user runs them: ``clients``, ``enqueue`` and ``backfill``,
against real PostgreSQL, Redis and the moto S3 server.

No worker runs here: what a producer promises is rows in the database and
messages in the right Redis list, and that is what these tests look at.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import func, select

from conftest import synthguard_command, wait_until
from worker.backfill import BackfillResult, TokenBucket, run_backfill
from worker.celery_app import BULK_QUEUE, REALTIME_QUEUE
from worker.cli import main
from worker.detector import Detector, checkpoint_version
from worker.models import DONE, FAILED, QUEUED, ApiClient, Image, Scan
from worker.scoring import Scorer

OLD_VERSION = "sha256:000000000000"


def _invoke(args: list[str], env: dict[str, str]) -> Any:
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def _message_ids(broker: redis.Redis, queue: str) -> list[uuid.UUID]:
    """The image ids of the score messages waiting in ``queue`` (kombu keeps a queue as a list);
    a bulk message names a chunk of them."""
    ids = []
    for raw in broker.lrange(queue, 0, -1):
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        ids += [uuid.UUID(text) for text in (args[0] if isinstance(args[0], list) else [args[0]])]
    return ids


def _put(s3_client, bucket: str, keys: list[str]) -> None:  # type: ignore[no-untyped-def]
    # Never fetched here: any bytes will do.
    for key in keys:
        s3_client.put_object(Bucket=bucket, Key=key, Body=b"not fetched")


def _scan(sessions, scan_id: str | uuid.UUID) -> Scan:  # type: ignore[no-untyped-def]
    with sessions() as session:
        scan = session.get(Scan, uuid.UUID(str(scan_id)))
        assert scan is not None
        return scan


def _images(sessions, scan_id: str | uuid.UUID) -> list[Image]:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return list(session.scalars(select(Image).where(Image.scan_id == uuid.UUID(str(scan_id)))))


def _finish(sessions, image_ids: list[uuid.UUID], **values: Any) -> None:  # type: ignore[no-untyped-def]
    """Make images terminal exactly as a worker does (the scorer's guarded decrement)."""
    with sessions.begin() as session:
        for image_id in image_ids:
            assert Scorer._finish(session, image_id, **values)


# ----------------------------------------------------------------------- clients


def test_clients_create_shows_the_key_once_and_stores_only_its_hash(service_env, sessions) -> None:
    result = _invoke(
        [
            "clients",
            "create",
            "acme uploads",
            "--bucket",
            "acme-uploads/incoming",
            "--webhook-url",
            "https://hooks.example.com/sg",
            "--threshold",
            "0.7",
            "--json",
        ],
        service_env,
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) == {"id", "api_key", "webhook_secret"}
    assert doc["api_key"].startswith("sg_") and doc["webhook_secret"].startswith("whsec_")

    with sessions() as session:
        client = session.get(ApiClient, uuid.UUID(doc["id"]))
        assert client is not None
        stored = [str(getattr(client, column.key)) for column in ApiClient.__table__.columns]
    assert client.api_key_hash == hashlib.sha256(doc["api_key"].encode()).hexdigest()
    assert not any(doc["api_key"] in value for value in stored)
    assert client.name == "acme uploads" and client.default_threshold == 0.7
    assert client.webhook_url == "https://hooks.example.com/sg"

    plain = _invoke(["clients", "create", "kyc", "--all-buckets"], service_env)
    assert plain.exit_code == 0, plain.output
    assert "sg_" in plain.stdout and "whsec_" in plain.stdout
    assert "only this once" in plain.stdout and "hash" in plain.stdout

    for args in (["clients", "list", "--json"], ["clients", "list"]):
        listed = _invoke(args, service_env)
        assert listed.exit_code == 0, listed.output
        assert doc["api_key"] not in listed.output and doc["webhook_secret"] not in listed.output
        assert "whsec_" not in listed.output
    clients = {c["id"]: c for c in json.loads(_invoke(["clients", "list", "--json"], service_env).stdout)}
    acme = clients[doc["id"]]
    assert doc["api_key"].startswith(acme["key_prefix"]) and len(acme["key_prefix"]) < len(doc["api_key"])
    assert acme["name"] == "acme uploads" and acme["default_threshold"] == 0.7
    assert acme["webhook_url"] == "https://hooks.example.com/sg" and acme["disabled"] is False
    assert acme["created_at"]
    assert acme["grants"] == ["acme-uploads/incoming/"] and acme["all_buckets"] is False
    assert clients[json.loads(_invoke(["clients", "list", "--json"], service_env).stdout)[-1]["id"]]["all_buckets"]


def test_clients_create_checks_the_webhook_url(service_env, sessions) -> None:
    with sessions() as session:
        before = session.scalar(select(func.count()).select_from(ApiClient))
    for url in ("http://hooks.example.com/sg", "ftp://hooks.example.com/", "https://", "hooks.example.com"):
        result = _invoke(["clients", "create", "x", "--all-buckets", "--webhook-url", url], service_env)
        assert result.exit_code == 2, (url, result.output)
        assert "--webhook-url" in result.output
    assert (
        "SYNTHGUARD_WEBHOOK_ALLOW_HTTP"
        in _invoke(
            ["clients", "create", "x", "--all-buckets", "--webhook-url", "http://hooks.example.com/sg"], service_env
        ).output
    )
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(ApiClient)) == before

    allowed = {**service_env, "SYNTHGUARD_WEBHOOK_ALLOW_HTTP": "true"}
    result = _invoke(
        ["clients", "create", "x", "--all-buckets", "--webhook-url", "http://hooks.example.com/sg", "--json"], allowed
    )
    assert result.exit_code == 0, result.output
    # An address inside the network is refused up front, as the sender would refuse it.
    inside = _invoke(["clients", "create", "x", "--all-buckets", "--webhook-url", "http://10.0.0.5/sg"], allowed)
    assert inside.exit_code == 2 and "private" in inside.output
    assert _invoke(["clients", "create", "x", "--all-buckets", "--webhook-url", "ftp://h/", "--json"], allowed).exit_code == 2


# ----------------------------------------------------------------------- enqueue


def test_enqueue_writes_queued_rows_then_one_message_each(
    service_env, sessions, broker, s3_client, bucket
) -> None:
    _put(s3_client, bucket, ["up/a.jpg", "up/b.png"])
    result = _invoke(
        ["enqueue", f"s3://{bucket}/up/a.jpg", f"s3://{bucket}/up/b.png", "--threshold", "0.8", "--json"],
        service_env,
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["priority"] == "realtime"
    assert [i["uri"] for i in doc["images"]] == [f"s3://{bucket}/up/a.jpg", f"s3://{bucket}/up/b.png"]
    ids = [uuid.UUID(i["id"]) for i in doc["images"]]

    rows = {row.id: row for row in _images(sessions, doc["scan_id"])}
    assert set(rows) == set(ids)
    assert all(
        row.state == QUEUED and row.threshold == 0.8 and row.client_id is None for row in rows.values()
    )
    assert {rows[i].key for i in ids} == {"up/a.jpg", "up/b.png"}
    scan = _scan(sessions, doc["scan_id"])
    assert (scan.origin, scan.priority, scan.image_count, scan.completed_at) == (
        "cli-enqueue",
        "realtime",
        2,
        None,
    )
    assert sorted(_message_ids(broker, REALTIME_QUEUE)) == sorted(ids)
    assert broker.llen(BULK_QUEUE) == 0

    bulk = _invoke(["enqueue", "--priority", "bulk", f"s3://{bucket}/up/a.jpg"], service_env)
    assert bulk.exit_code == 0, bulk.output
    assert "queued" in bulk.stdout
    assert len(_message_ids(broker, BULK_QUEUE)) == 1
    assert broker.llen(REALTIME_QUEUE) == 2


@pytest.mark.parametrize("uri", ["not-a-uri", "s3://", "s3://bucket-only", "s3://bucket/dir/", "https://b/k"])
def test_enqueue_refuses_malformed_uris_before_writing_anything(
    service_env, sessions, broker, uri: str
) -> None:
    with sessions() as session:
        before = session.scalar(select(func.count()).select_from(Scan))
    result = _invoke(["enqueue", "s3://fine/key.jpg", uri], service_env)
    assert result.exit_code == 2, result.output
    assert "S3_URI" in result.output and "s3://" in result.output
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Scan)) == before
    assert broker.llen(REALTIME_QUEUE) == 0


# ---------------------------------------------------------------------- backfill


def test_backfill_queues_a_prefix_on_the_bulk_lane_and_resumes(
    service_env, service_settings, sessions, broker, s3_client, bucket
) -> None:
    keys = [f"photos/{i:03d}.jpg" for i in range(25)]
    _put(s3_client, bucket, [*keys, "photos/dir/", "other/outside.jpg"])
    current = checkpoint_version(service_settings)

    first = _invoke(["backfill", f"s3://{bucket}/photos/", "--page-size", "10", "--json"], service_env)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary == {
        "scan_id": summary["scan_id"],
        "listed": 25,
        "enqueued": 25,
        "skipped": 0,
        "model_version": current,
    }
    images = _images(sessions, summary["scan_id"])
    assert sorted(i.key for i in images) == keys
    assert all(i.state == QUEUED and i.client_id is None for i in images)
    assert sorted(_message_ids(broker, BULK_QUEUE)) == sorted(i.id for i in images)
    assert broker.llen(REALTIME_QUEUE) == 0
    scan = _scan(sessions, summary["scan_id"])
    assert (scan.origin, scan.priority, scan.client_id) == ("backfill", "bulk", None)
    # Every image still pending and the listing hold released: not complete.
    assert (scan.image_count, scan.pending_count, scan.completed_at) == (25, 25, None)

    # Straight away again: everything is queued already.
    again = _invoke(["backfill", f"s3://{bucket}/photos/", "--page-size", "10", "--json"], service_env)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["enqueued"] == 0 and json.loads(again.stdout)["skipped"] == 25
    assert len(_message_ids(broker, BULK_QUEUE)) == 25  # nothing published again
    empty = _scan(sessions, json.loads(again.stdout)["scan_id"])
    assert empty.image_count == 0 and empty.completed_at is not None

    # Some scored by this model, some by an older one, one failed; then new objects arrive.
    by_key = {i.key: i.id for i in images}
    _finish(
        sessions, [by_key[k] for k in keys[:2]], state=DONE, score=0.1, flagged=False, model_version=current
    )
    # In a versioned bucket a worker stores the version it fetched; the listing names none.
    _finish(
        sessions,
        [by_key[k] for k in keys[2:5]],
        state=DONE,
        score=0.1,
        flagged=False,
        model_version=current,
        version_id="3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY",
    )
    _finish(
        sessions,
        [by_key[k] for k in keys[5:9]],
        state=DONE,
        score=0.9,
        flagged=True,
        model_version=OLD_VERSION,
    )
    _finish(sessions, [by_key[keys[9]]], state=FAILED, error_code="storage_unavailable", error_message="x")
    new = [f"photos/new/{i}.jpg" for i in range(3)]
    _put(s3_client, bucket, new)

    third = _invoke(
        ["backfill", f"s3://{bucket}/photos/", "--page-size", "10", "--rate", "1000", "--json"], service_env
    )
    assert third.exit_code == 0, third.output
    doc = json.loads(third.stdout)
    expected = {*keys[5:10], *new}
    assert (doc["listed"], doc["enqueued"], doc["skipped"]) == (28, len(expected), 28 - len(expected))
    requeued = _images(sessions, doc["scan_id"])
    assert {i.key for i in requeued} == expected
    messages = _message_ids(broker, BULK_QUEUE)
    assert len(messages) == 25 + len(expected)
    assert set(messages) >= {i.id for i in requeued}


def test_backfill_plain_output_and_bad_prefixes(service_env, s3_client, bucket) -> None:
    _put(s3_client, bucket, ["a/1.jpg"])
    result = _invoke(["backfill", f"s3://{bucket}/a/", "--rate", "5"], service_env)
    assert result.exit_code == 0, result.output
    assert "listed 1, enqueued 1, skipped 0" in result.stdout

    for uri in ("bucket/prefix", "s3://", "gs://bucket/x"):
        bad = _invoke(["backfill", uri], service_env)
        assert bad.exit_code == 2, (uri, bad.output)
        assert "S3_PREFIX" in bad.output
    assert _invoke(["backfill", f"s3://{bucket}/a/", "--rate", "0"], service_env).exit_code == 2
    assert _invoke(["backfill", f"s3://{bucket}/a/", "--priority", "realtime"], service_env).exit_code == 2

    missing = _invoke(["backfill", f"s3://no-such-bucket-{bucket}/a/", "--json"], service_env)
    assert missing.exit_code == 1
    assert "cannot list" in missing.stderr
    assert json.loads(missing.stdout)["enqueued"] == 0


def test_backfill_scan_completes_only_after_listing_ends(
    service_settings, celery_app, sessions, s3_client, bucket
) -> None:
    """Workers that finish every image of the early pages must not complete a scan still listing."""
    _put(s3_client, bucket, [f"p/{i:02d}.jpg" for i in range(25)])
    version = checkpoint_version(service_settings)
    seen: list[BackfillResult] = []

    def finish_what_is_queued(progress: BackfillResult) -> None:
        seen.append(progress)
        queued = [i.id for i in _images(sessions, progress.scan_id) if i.state == QUEUED]
        _finish(sessions, queued, state=DONE, score=0.2, flagged=False, model_version=version)
        scan = _scan(sessions, progress.scan_id)
        # Every image listed so far is done, but the listing still holds the scan open.
        assert scan.image_count == progress.enqueued and scan.pending_count == 1
        assert scan.completed_at is None

    result = run_backfill(
        service_settings, sessions, celery_app, bucket, "p/", page_size=10, on_progress=finish_what_is_queued
    )
    assert [p.listed for p in seen] == [10, 20, 25]
    assert (result.listed, result.enqueued, result.skipped, result.interrupted) == (25, 25, 0, False)
    scan = _scan(sessions, result.scan_id)
    assert scan.pending_count == 0 and scan.completed_at is not None

    # Done by the current model: a new run has nothing to do, and its scan completes at once.
    again = run_backfill(service_settings, sessions, celery_app, bucket, "p/", page_size=10)
    assert (again.enqueued, again.skipped) == (0, 25)
    assert _scan(sessions, again.scan_id).completed_at is not None


def test_backfill_stopped_between_pages_keeps_what_it_committed_and_resumes(
    service_settings, celery_app, sessions, broker, s3_client, bucket
) -> None:
    _put(s3_client, bucket, [f"s/{i:02d}.jpg" for i in range(25)])
    pages: list[BackfillResult] = []

    stopped = run_backfill(
        service_settings,
        sessions,
        celery_app,
        bucket,
        "s/",
        page_size=10,
        on_progress=pages.append,
        should_stop=lambda: bool(pages),
    )
    assert stopped.interrupted and (stopped.listed, stopped.enqueued, stopped.published) == (10, 10, 10)
    scan = _scan(sessions, stopped.scan_id)
    # The hold is released: the scan completes when its ten images do.
    assert (scan.image_count, scan.pending_count, scan.completed_at) == (10, 10, None)
    _finish(sessions, [i.id for i in _images(sessions, stopped.scan_id)], state=FAILED, error_code="x")
    assert _scan(sessions, stopped.scan_id).completed_at is not None

    resumed = run_backfill(service_settings, sessions, celery_app, bucket, "s/", page_size=10, rate=50)
    # The ten failed ones are queued again, with the fifteen never listed.
    assert (resumed.listed, resumed.enqueued, resumed.interrupted) == (25, 25, False)
    assert len(_message_ids(broker, BULK_QUEUE)) == 35


def test_backfill_ctrl_c_prints_the_summary_so_far_and_exits_130(
    service_env, sessions, s3_client, bucket, tmp_path: Path
) -> None:
    _put(s3_client, bucket, [f"c/{i:02d}.jpg" for i in range(20)])
    uri = f"s3://{bucket}/c/"
    # One image a second: the run cannot finish before the signal arrives.
    proc = subprocess.Popen(
        [*synthguard_command(), "backfill", uri, "--page-size", "5", "--rate", "1", "--json"],
        env={**os.environ, **service_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def first_page_committed() -> uuid.UUID | None:
            with sessions() as session:
                return session.scalar(
                    select(Scan.id).where(Scan.source == uri, Scan.image_count >= 5).limit(1)
                )

        scan_id = wait_until(first_page_committed, timeout=120, message="the first page")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    summary = json.loads(out)
    assert summary["scan_id"] == str(scan_id)
    assert 5 <= summary["enqueued"] == summary["listed"] < 20
    assert "interrupted" in err and "sweeper" in err
    scan = _scan(sessions, scan_id)
    assert scan.image_count == summary["enqueued"] == scan.pending_count  # hold released


# ---------------------------------------------------------------- model version


def test_checkpoint_version_is_the_version_the_detector_stores(service_settings, checkpoint: Path) -> None:
    version = checkpoint_version(service_settings)
    assert version == "sha256:" + hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12]
    assert version == Detector.from_settings(service_settings).version


def test_token_bucket_holds_the_rate_on_a_virtual_clock() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = TokenBucket(10, clock=lambda: now[0], sleep=sleep)
    for _ in range(10):
        assert limiter.take(5)
    # 50 tokens: 10 from the full bucket, 40 earned at 10 a second.
    assert now[0] == pytest.approx(4.0)
    stopped = TokenBucket(1, clock=lambda: now[0], sleep=sleep)
    assert stopped.take(1) and not stopped.take(1, should_stop=lambda: True)
