"""Tenant boundaries: grants on every intake path, object references, lanes, quotas, limits, keys.

Real PostgreSQL, Redis, a moto S3 server (its request recorder shows what the
worker fetched) and the FastAPI app; the CLI through click's runner.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import event, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from api_stub import ratelimit
from api_stub.app import create_app
from conftest import wait_until
from worker.celery_app import BULK_QUEUE, OVERFLOW_QUEUE, REALTIME_QUEUE
from worker.cli import main
from worker.clients import create_client
from worker.detector import Detector
from worker.errors import ACCESS_DENIED, NotGranted
from worker.models import FAILED, ApiClient, Image
from worker.queueing import enqueue, realtime_share, sweep_stale
from worker.scoring import Scorer
from worker.storage import check_bucket_name, check_object_key
from worker.tenancy import Grant

PROBLEM = "application/problem+json"


@pytest.fixture
def make_client(sessions: sessionmaker[Session]) -> Callable[..., tuple[uuid.UUID, dict[str, str]]]:
    """A client with the given grants (``BUCKET[/PREFIX]`` strings) and columns; its id and auth headers."""

    def make(
        *grants: str, name: str | None = None, all_buckets: bool = False, **columns: Any
    ) -> tuple[uuid.UUID, dict[str, str]]:
        with sessions.begin() as session:
            created = create_client(
                session,
                name or f"client-{uuid.uuid4().hex[:8]}",
                grants=[Grant.parse(g) for g in grants],
                all_buckets=all_buckets,
            )
            for column, value in columns.items():
                setattr(created.client, column, value)
            client_id = created.client.id
        return client_id, {"Authorization": f"Bearer {created.api_key}"}

    return make


def image_count(sessions: sessionmaker[Session], client_id: uuid.UUID) -> int:
    with sessions() as session:
        return int(
            session.scalar(select(func.count()).select_from(Image).where(Image.client_id == client_id)) or 0
        )


def queued_messages(broker: redis.Redis) -> int:
    return sum(int(broker.llen(queue)) for queue in (REALTIME_QUEUE, OVERFLOW_QUEUE, BULK_QUEUE))


def assert_problem(response: httpx.Response, status: int, slug: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    if slug is not None:
        assert body["type"] == f"urn:synthguard:problem:{slug}", body
    return body


def _event(bucket: str, key: str) -> dict[str, Any]:
    return {
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {"key": key, "eTag": "abc", "sequencer": "01"}},
    }


def _cli(args: list[str], env: dict[str, str]) -> Any:
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


# ------------------------------------------------------------------------ grants


def test_a_client_is_refused_on_another_clients_bucket_on_every_intake_path(
    api, make_client, sessions, broker, service_env, service_settings, celery_app, s3_client
) -> None:
    alpha_id, alpha = make_client("alpha-uploads")
    make_client("accept-private", name="beta")
    s3_client.create_bucket(Bucket="accept-private")
    s3_client.put_object(Bucket="accept-private", Key="secret/kyc.jpg", Body=b"not for alpha")
    private = {"bucket": "accept-private", "key": "secret/kyc.jpg"}

    scans = api.post(
        "/v1/scans", json={"objects": [{"bucket": "alpha-uploads", "key": "a.jpg"}, private]}, headers=alpha
    )
    problem = assert_problem(scans, 403, "not-granted")
    assert problem["bucket"] == "accept-private" and "accept-private" in problem["detail"]

    events = api.post(
        "/v1/s3-events",
        json={"Records": [_event("alpha-uploads", "b.jpg"), _event("accept-private", "secret/kyc.jpg")]},
        headers=alpha,
    )
    assert assert_problem(events, 403, "not-granted")["bucket"] == "accept-private"

    with pytest.raises(NotGranted) as refused:
        enqueue(
            ["s3://accept-private/secret/kyc.jpg"],
            client_id=alpha_id,
            settings=service_settings,
            sessions=sessions,
            app=celery_app,
        )
    assert refused.value.bucket == "accept-private"

    queued = _cli(["enqueue", "--client", str(alpha_id), "s3://accept-private/secret/kyc.jpg"], service_env)
    assert queued.exit_code == 1 and "no grant" in queued.output
    backfill = _cli(["backfill", "--client", str(alpha_id), "s3://accept-private/secret/"], service_env)
    assert backfill.exit_code == 1 and "no grant" in backfill.output

    # Nothing of it exists: no image row, no message, no scan for alpha.
    assert image_count(sessions, alpha_id) == 0
    assert queued_messages(broker) == 0


def test_a_prefix_grant_is_a_folder(api, make_client, sessions) -> None:
    client_id, headers = make_client("shared-bucket/prefix")
    inside = api.post(
        "/v1/scans", json={"objects": [{"bucket": "shared-bucket", "key": "prefix/x.jpg"}]}, headers=headers
    )
    assert inside.status_code == 202, inside.text
    for key in ("prefixother/x.jpg", "prefix", "other/prefix/x.jpg"):
        outside = api.post(
            "/v1/scans", json={"objects": [{"bucket": "shared-bucket", "key": key}]}, headers=headers
        )
        assert_problem(outside, 403, "not-granted")
    wrong_bucket = api.post(
        "/v1/scans", json={"objects": [{"bucket": "shared-bucket2", "key": "prefix/x.jpg"}]}, headers=headers
    )
    assert_problem(wrong_bucket, 403, "not-granted")
    assert image_count(sessions, client_id) == 1


def test_grant_and_revoke_through_the_cli_change_what_the_api_admits(
    api, make_client, service_env, sessions
) -> None:
    client_id, headers = make_client("first-bucket")
    objects = {"objects": [{"bucket": "second-bucket", "key": "in/a.jpg"}]}
    assert_problem(api.post("/v1/scans", json=objects, headers=headers), 403, "not-granted")

    granted = _cli(["clients", "grant", str(client_id), "second-bucket/in"], service_env)
    assert granted.exit_code == 0, granted.output
    assert api.post("/v1/scans", json=objects, headers=headers).status_code == 202
    listed = {c["id"]: c for c in json.loads(_cli(["clients", "list", "--json"], service_env).stdout)}
    assert listed[str(client_id)]["grants"] == ["first-bucket", "second-bucket/in/"]

    # Revoking needs the grant exactly as listed; a near miss changes nothing and says what there is.
    miss = _cli(["clients", "revoke", str(client_id), "second-bucket"], service_env)
    assert miss.exit_code == 1 and "second-bucket/in/" in miss.output
    revoked = _cli(["clients", "revoke", str(client_id), "second-bucket/in"], service_env)
    assert revoked.exit_code == 0, revoked.output
    assert_problem(api.post("/v1/scans", json=objects, headers=headers), 403, "not-granted")
    bad = _cli(
        ["clients", "grant", str(client_id), "arn:aws:s3:us-east-1:123456789012:accesspoint/ap"], service_env
    )
    assert bad.exit_code == 2 and "ARN" in bad.output


def test_clients_create_needs_buckets_or_all_buckets(service_env) -> None:
    neither = _cli(["clients", "create", "nothing"], service_env)
    assert neither.exit_code == 2 and "--all-buckets" in neither.output
    both = _cli(["clients", "create", "both", "--bucket", "some-bucket", "--all-buckets"], service_env)
    assert both.exit_code == 2


def test_a_grant_revoked_after_intake_fails_the_image_unfetched(
    make_client, sessions, service_env, service_settings, celery_app, s3_client, s3_endpoint
) -> None:
    s3_client.create_bucket(Bucket="revoked-later")
    s3_client.put_object(Bucket="revoked-later", Key="kyc/doc.jpg", Body=b"\xff\xd8\xff not fetched")
    client_id, _ = make_client("revoked-later/kyc")
    done = enqueue(
        ["s3://revoked-later/kyc/doc.jpg"],
        client_id=client_id,
        settings=service_settings,
        sessions=sessions,
        app=celery_app,
    )
    assert _cli(["clients", "revoke", str(client_id), "revoked-later/kyc"], service_env).exit_code == 0
    # A client disabled after intake loses its queued images the same way.
    disabled_id, _ = make_client("revoked-later/kyc")
    disabled = enqueue(
        ["s3://revoked-later/kyc/doc.jpg"],
        client_id=disabled_id,
        settings=service_settings,
        sessions=sessions,
        app=celery_app,
    )
    assert _cli(["clients", "disable", str(disabled_id)], service_env).exit_code == 0

    recorder = f"{s3_endpoint}/moto-api/recorder"
    httpx.post(f"{recorder}/reset-recording").raise_for_status()
    httpx.post(f"{recorder}/start-recording").raise_for_status()
    try:
        settings = service_settings.model_copy(update={"prepare_processes": 0})
        with Scorer(settings, Detector.from_settings(settings), sessions=sessions) as scorer:
            outcome = scorer.process_image(done.image_ids[0])
            disabled_outcome = scorer.process_image(disabled.image_ids[0])
    finally:
        httpx.post(f"{recorder}/stop-recording").raise_for_status()
    requests = [
        json.loads(line) for line in httpx.get(f"{recorder}/download-recording").text.splitlines() if line
    ]

    assert outcome.state == FAILED and outcome.error_code == ACCESS_DENIED
    assert disabled_outcome.state == FAILED and disabled_outcome.error_code == ACCESS_DENIED
    with sessions() as session:
        row = session.get(Image, done.image_ids[0])
        assert row is not None and row.state == FAILED and row.error_code == ACCESS_DENIED
        assert "not fetched" in (row.error_message or "") and row.sha256 is None
    assert not [r for r in requests if "revoked-later" in r["url"]], requests


# ----------------------------------------------------------- object references


@pytest.mark.parametrize(
    ("obj", "field", "message"),
    [
        ({"bucket": "arn:aws:s3:us-east-1:123456789012:accesspoint/ap", "key": "a.jpg"}, "bucket", "ARN"),
        ({"bucket": "arn:aws:s3-object-lambda:us-east-1:1:accesspoint/x", "key": "a.jpg"}, "bucket", "ARN"),
        ({"bucket": "myap-abcdefgh-s3alias", "key": "a.jpg"}, "bucket", "reserve"),
        ({"bucket": "Uploads_Old", "key": "a.jpg"}, "bucket", "lowercase"),
        ({"bucket": "192.168.1.1", "key": "a.jpg"}, "bucket", "IP address"),
        ({"bucket": "ok-bucket", "key": "../other-tenant/a.jpg"}, "key", "'..'"),
        ({"bucket": "ok-bucket", "key": "kyc/./a.jpg"}, "key", "'.'"),
        ({"bucket": "ok-bucket", "key": "kyc/a\x00.jpg"}, "key", "control"),
        ({"bucket": "ok-bucket", "key": "kyc/a\n.jpg"}, "key", "control"),
        ({"bucket": "ok-bucket", "key": "é" * 513}, "key", "1024"),
        ({"bucket": "ok-bucket", "key": "a.jpg", "version_id": "v" * 1025}, "version_id", "1024"),
    ],
)
def test_malformed_object_references_are_422_naming_the_field(
    api, make_client, sessions, obj, field, message
) -> None:
    client_id, headers = make_client(all_buckets=True)
    problem = assert_problem(api.post("/v1/scans", json={"objects": [obj]}, headers=headers), 422)
    assert any(err["loc"][-1] == field and message in err["msg"] for err in problem["errors"]), problem
    assert image_count(sessions, client_id) == 0


@pytest.mark.parametrize(
    ("record_object", "bucket", "field"),
    [
        ({"key": "a.jpg"}, "arn:aws:s3:us-east-1:1:accesspoint/ap", "s3.bucket.name"),
        ({"key": "kyc/%2E%2E/a.jpg"}, "ok-bucket", "s3.object.key"),
        ({"key": "kyc/a%00.jpg"}, "ok-bucket", "s3.object.key"),
        ({"key": "a.jpg", "versionId": "v" * 1025}, "ok-bucket", "s3.object.versionId"),
        ({"key": "a.jpg", "eTag": "e" * 201}, "ok-bucket", "s3.object.eTag"),
    ],
)
def test_malformed_event_records_are_422_naming_the_field(
    api, make_client, sessions, record_object, bucket, field
) -> None:
    client_id, headers = make_client(all_buckets=True)
    record = {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": bucket}, "object": record_object}}
    problem = assert_problem(api.post("/v1/s3-events", json={"Records": [record]}, headers=headers), 422)
    assert field in json.dumps(problem["errors"]), problem
    assert image_count(sessions, client_id) == 0


def test_reference_rules_accept_what_s3_accepts() -> None:
    for name in ("abc", "my.bucket-2026", "a" * 63):
        assert check_bucket_name(name) == name
    for key in ("a", "photos/my summer é.jpg", "a..b/c.d", "x" * 1024, "dir//double"):
        assert check_object_key(key) == key
    assert Grant.parse("s3://uploads/kyc") == Grant("uploads", "kyc/")
    assert Grant.parse("uploads/") == Grant("uploads", "")


# --------------------------------------------------------------- lanes and quotas


def test_a_client_limited_to_bulk_cannot_queue_realtime_and_its_events_go_to_bulk(
    api, make_client, broker
) -> None:
    _, headers = make_client("bulk-only", lanes=["bulk"])
    refused = api.post(
        "/v1/scans", json={"objects": [{"bucket": "bulk-only", "key": "a.jpg"}]}, headers=headers
    )
    assert assert_problem(refused, 403, "lane-not-allowed")["allowed_lanes"] == ["bulk"]
    events = api.post("/v1/s3-events", json={"Records": [_event("bulk-only", "b.jpg")]}, headers=headers)
    assert events.status_code == 202, events.text
    assert broker.llen(BULK_QUEUE) == 1 and broker.llen(REALTIME_QUEUE) == 0


def test_an_image_quota_gives_429_with_retry_after(api, make_client, sessions, broker) -> None:
    client_id, headers = make_client("capped", max_pending_realtime=3)
    objects = [{"bucket": "capped", "key": f"k{i}.jpg"} for i in range(3)]
    assert api.post("/v1/scans", json={"objects": objects[:2]}, headers=headers).status_code == 202

    over = api.post(
        "/v1/scans", json={"objects": [*objects[2:], {"bucket": "capped", "key": "k9.jpg"}]}, headers=headers
    )
    problem = assert_problem(over, 429, "quota-exceeded")
    assert int(over.headers["Retry-After"]) > 0 and problem["limit"] == 3
    assert image_count(sessions, client_id) == 2
    # Bulk has its own cap; the full realtime lane does not block it.
    assert (
        api.post("/v1/scans", json={"objects": objects[2:], "priority": "bulk"}, headers=headers).status_code
        == 202
    )
    # One more realtime image still fits.
    assert api.post("/v1/scans", json={"objects": objects[2:]}, headers=headers).status_code == 202
    assert queued_messages(broker) == 4


# ---------------------------------------------------------------- fairness


@pytest.mark.parametrize(
    ("pending", "count", "burst", "ahead"),
    [
        (0, 1, 32, 1),  # one upload, nothing pending: realtime
        (0, 40, 32, 32),  # a flood's first burst is realtime, the rest overflow
        (30, 5, 32, 2),
        (32, 1, 32, 0),  # at the burst: everything new overflows
        (500, 3, 32, 0),
        (500, 3, 0, 3),  # burst 0: overflow off
    ],
)
def test_realtime_share(pending: int, count: int, burst: int, ahead: int) -> None:
    assert realtime_share(pending, count, burst) == ahead


def _jpeg(seed: int) -> bytes:
    import io

    from PIL import Image as PILImage

    out = io.BytesIO()
    PILImage.new("RGB", (48, 48), (seed * 37 % 256, 90, 160)).save(out, "JPEG", quality=85)
    return out.getvalue()


def _message_ids(broker: redis.Redis, queue: str) -> list[uuid.UUID]:
    """Image ids of the score messages waiting in ``queue``, oldest first (kombu pushes left)."""
    import base64

    ids = []
    for raw in reversed(broker.lrange(queue, 0, -1)):
        args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
        ids.append(uuid.UUID(args[0]))
    return ids


def test_one_clients_flood_waits_behind_another_clients_realtime_images(
    service_settings, celery_app, make_client, sessions, broker, s3_client, start_service
) -> None:
    s3_client.create_bucket(Bucket="flood")
    s3_client.create_bucket(Bucket="kyc")
    for i in range(7):
        s3_client.put_object(Bucket="flood", Key=f"f{i}.jpg", Body=_jpeg(i))
    s3_client.put_object(Bucket="kyc", Key="id.jpg", Body=_jpeg(99))
    _, alpha = make_client("flood")
    _, beta = make_client("kyc")
    settings = service_settings.model_copy(update={"realtime_burst": 2})
    with TestClient(create_app(settings, celery=celery_app)) as api:
        objects = [{"bucket": "flood", "key": f"f{i}.jpg"} for i in range(6)]
        flood = api.post("/v1/scans", json={"objects": objects}, headers=alpha)
        assert flood.status_code == 202, flood.text
        upload = api.post("/v1/s3-events", json={"Records": [_event("kyc", "id.jpg")]}, headers=beta)
        assert upload.status_code == 202, upload.text
        # alpha still has 6 pending: its next image overflows too, from any intake path.
        more = api.post("/v1/s3-events", json={"Records": [_event("flood", "f6.jpg")]}, headers=alpha)
        assert more.status_code == 202, more.text
    flood_ids = [uuid.UUID(i["id"]) for i in flood.json()["images"]]
    (beta_id,) = [uuid.UUID(i["id"]) for i in upload.json()["images"]]
    (late_id,) = [uuid.UUID(i["id"]) for i in more.json()["images"]]
    assert _message_ids(broker, REALTIME_QUEUE) == [*flood_ids[:2], beta_id]
    assert _message_ids(broker, OVERFLOW_QUEUE) == [*flood_ids[2:], late_id]

    # One thread: images are scored one at a time, in the order the worker takes them.
    start_service("worker", concurrency=1)
    done = wait_until(lambda: _completed(sessions, [*flood_ids, late_id, beta_id]), message="every image")
    overflowed = [done[i] for i in [*flood_ids[2:], late_id]]
    assert done[beta_id] < min(overflowed), "beta's upload waited behind alpha's flood"


def _completed(sessions: sessionmaker[Session], ids: list[uuid.UUID]) -> dict[uuid.UUID, Any] | None:
    """Each image's completed_at once all are terminal, else None."""
    with sessions() as session:
        rows = session.execute(select(Image.id, Image.completed_at).where(Image.id.in_(ids))).all()
    if len(rows) < len(ids) or any(r.completed_at is None for r in rows):
        return None
    return {r.id: r.completed_at for r in rows}


def test_the_sweeper_sends_one_clients_lost_flood_back_behind_the_others(
    service_settings, celery_app, make_client, sessions, broker
) -> None:
    alpha_id, _ = make_client("flood")
    beta_id, _ = make_client("kyc")
    flood = enqueue(
        [f"s3://flood/f{i}.jpg" for i in range(5)],
        client_id=alpha_id,
        settings=service_settings,
        sessions=sessions,
        app=celery_app,
    )
    upload = enqueue(
        ["s3://kyc/id.jpg"], client_id=beta_id, settings=service_settings, sessions=sessions, app=celery_app
    )
    broker.flushdb()  # Redis restarted without persistence: every message is gone
    with sessions.begin() as session:
        # Older than any image another test of this session may have left queued.
        session.execute(
            update(Image)
            .where(Image.id.in_([*flood.image_ids, *upload.image_ids]))
            .values(updated_at=Image.updated_at - timedelta(days=30))
        )
    assert sweep_stale(sessions, celery_app, stale_after_s=20 * 86400.0, realtime_burst=2) == 6
    realtime, overflow = _message_ids(broker, REALTIME_QUEUE), _message_ids(broker, OVERFLOW_QUEUE)
    assert upload.image_ids[0] in realtime
    assert len(set(realtime) & set(flood.image_ids)) == 2 and set(overflow) < set(flood.image_ids)
    assert len(overflow) == 3


def test_images_per_minute_count_objects_not_requests(api, make_client, sessions) -> None:
    client_id, headers = make_client("counted", images_per_minute=5)
    four = [{"bucket": "counted", "key": f"k{i}.jpg"} for i in range(4)]
    assert api.post("/v1/scans", json={"objects": four}, headers=headers).status_code == 202
    over = api.post("/v1/scans", json={"objects": four[:2]}, headers=headers)
    assert_problem(over, 429, "rate-limited")
    assert "images" in over.json()["detail"] and int(over.headers["Retry-After"]) > 0
    # The refused request took nothing: the one image left in the window still fits.
    assert api.post("/v1/scans", json={"objects": four[:1]}, headers=headers).status_code == 202
    assert image_count(sessions, client_id) == 5


def test_invalid_keys_are_limited_per_address_before_the_database_is_asked(
    service_settings, celery_app, make_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One fixed minute: a window boundary between the requests would reset the count.
    frozen = (time.time() // 60) * 60 + 30
    monkeypatch.setattr(ratelimit, "time", SimpleNamespace(time=lambda: frozen, monotonic=time.monotonic))
    _, good = make_client(all_buckets=True)
    settings = service_settings.model_copy(update={"api_auth_failures_per_minute": 3})
    app = create_app(settings, celery=celery_app)
    engine = app.state.api.sessions.kw["bind"]
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        with TestClient(app) as api:
            for _ in range(3):
                assert (
                    api.get(
                        f"/v1/scans/{uuid.uuid4()}", headers={"Authorization": "Bearer sg_guess"}
                    ).status_code
                    == 401
                )
            asked = len(statements)
            assert asked >= 3
            for headers in ({"Authorization": "Bearer sg_guess2"}, good):
                limited = api.post(
                    "/v1/scans", json={"objects": [{"bucket": "abc", "key": "k"}]}, headers=headers
                )
                assert_problem(limited, 429, "address-rate-limited")
                assert int(limited.headers["Retry-After"]) > 0
            assert len(statements) == asked  # neither refusal reached the database
    finally:
        event.remove(engine, "before_cursor_execute", count)


@pytest.mark.parametrize("own_redis", [True, False], ids=["rate-limit-redis", "none"])
def test_with_a_broker_that_is_not_redis_the_limits_need_a_redis_of_their_own(
    service_settings, own_redis: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # RabbitMQ's URL: nothing here publishes, so no RabbitMQ need listen.
    settings = service_settings.model_copy(
        update={
            "broker_url": "amqp://guest:guest@127.0.0.1:5672//",
            "rate_limit_redis_url": service_settings.broker_url if own_redis else None,
            "api_auth_failures_per_minute": 3,
        }
    )
    guess = {"Authorization": "Bearer sg_guess"}
    with caplog.at_level("WARNING", logger="api_stub.ratelimit"), TestClient(create_app(settings)) as api:
        # Three failures, then at most four more: a minute boundary may reset the count once, never twice.
        statuses = [api.get(f"/v1/scans/{uuid.uuid4()}", headers=guess).status_code for _ in range(7)]
    assert statuses[:3] == [401] * 3
    if own_redis:
        # Key guessing from one address is slowed with RabbitMQ as the broker too.
        assert 429 in statuses[3:] and set(statuses) == {401, 429}
        assert "rate limiting is off" not in caplog.text
    else:
        assert statuses == [401] * 7
        assert "SYNTHGUARD_RATE_LIMIT_REDIS_URL is unset" in caplog.text


def test_the_rate_limit_redis_must_be_redis() -> None:
    from pydantic import ValidationError

    from worker.settings import Settings

    with pytest.raises(ValidationError, match="rate limiter's counters live in Redis"):
        Settings(rate_limit_redis_url="amqp://guest:guest@127.0.0.1:5672//")
    assert Settings(broker_url="redis://10.0.0.1:6379/0").rate_limit_url == "redis://10.0.0.1:6379/0"
    assert Settings(rate_limit_redis_url="unix:///run/redis.sock").rate_limit_url == "unix:///run/redis.sock"


def test_limits_fail_closed_when_their_redis_is_down(service_settings, make_client, sessions) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client_id, headers = make_client(all_buckets=True)
    settings = service_settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{port}/0"})
    with TestClient(create_app(settings)) as api:
        down = api.post("/v1/scans", json={"objects": [{"bucket": "abc", "key": "k.jpg"}]}, headers=headers)
        assert_problem(down, 503, "rate-limiter-unavailable")
        assert "Retry-After" in down.headers
    assert image_count(sessions, client_id) == 0


# ---------------------------------------------------------------------- API keys


def test_a_rotated_key_works_for_its_overlap_then_stops(api, make_client, service_env, sessions) -> None:
    client_id, old = make_client(all_buckets=True)
    scans = f"/v1/scans/{uuid.uuid4()}"

    rotated = _cli(["clients", "rotate-key", str(client_id), "--overlap", "3600", "--json"], service_env)
    assert rotated.exit_code == 0, rotated.output
    new = {"Authorization": f"Bearer {json.loads(rotated.stdout)['api_key']}"}
    assert api.get(scans, headers=old).status_code == 404  # authenticated: the scan just does not exist
    assert api.get(scans, headers=new).status_code == 404

    with sessions.begin() as session:  # the overlap has run out
        session.execute(
            update(ApiClient)
            .where(ApiClient.id == client_id)
            .values(api_key_previous_until=ApiClient.api_key_previous_until - timedelta(hours=2))
        )
    assert_problem(api.get(scans, headers=old), 401)
    assert api.get(scans, headers=new).status_code == 404

    # Without an overlap the key being replaced stops at once (a leaked key).
    again = _cli(["clients", "rotate-key", str(client_id), "--json"], service_env)
    newest = {"Authorization": f"Bearer {json.loads(again.stdout)['api_key']}"}
    assert_problem(api.get(scans, headers=new), 401)
    assert api.get(scans, headers=newest).status_code == 404


def test_a_disabled_client_gets_401(api, make_client, service_env) -> None:
    client_id, headers = make_client(all_buckets=True)
    assert api.get(f"/v1/scans/{uuid.uuid4()}", headers=headers).status_code == 404
    assert _cli(["clients", "disable", str(client_id)], service_env).exit_code == 0
    problem = assert_problem(api.get(f"/v1/scans/{uuid.uuid4()}", headers=headers), 401)
    assert "disabled" in problem["detail"]


def test_the_database_holds_no_plain_text_webhook_secret(service_env, sessions) -> None:
    created = _cli(["clients", "create", "sealed", "--all-buckets", "--json"], service_env)
    assert created.exit_code == 0, created.output
    doc = json.loads(created.stdout)
    with sessions() as session:
        client = session.get(ApiClient, uuid.UUID(doc["id"]))
        assert client is not None
        stored = [str(getattr(client, column.key)) for column in ApiClient.__table__.columns]
    assert not any(doc["webhook_secret"] in value or "whsec_" in value for value in stored)


def test_the_api_and_worker_refuse_postgresql_without_a_secret_key(service_env) -> None:
    env = {k: v for k, v in service_env.items() if k != "SYNTHGUARD_SECRET_KEY"}
    for command in (["api"], ["worker"]):
        result = _cli(command, env)
        assert result.exit_code == 1 and "SYNTHGUARD_SECRET_KEY" in result.output, result.output


def test_a_client_limited_to_registered_callback_hosts_may_name_only_those(
    api, make_client, sessions, service_env
) -> None:
    client_id, headers = make_client("hooked", callback_hosts=["hooks.example.com"])
    objects = [{"bucket": "hooked", "key": "a.jpg"}]
    elsewhere = api.post(
        "/v1/scans",
        json={"objects": objects, "callback_url": "https://victim.example.net/x"},
        headers=headers,
    )
    problem = assert_problem(elsewhere, 422)
    assert (
        problem["errors"][0]["loc"][-1] == "callback_url"
        and "victim.example.net" in problem["errors"][0]["msg"]
    )
    registered = api.post(
        "/v1/scans",
        json={"objects": objects, "callback_url": "https://HOOKS.example.com/in"},
        headers=headers,
    )
    assert registered.status_code == 202, registered.text
    assert image_count(sessions, client_id) == 1

    # The operator changes the list, then drops it: any host the URL policy allows.
    moved = _cli(["clients", "set", str(client_id), "--callback-host", "hooks.example.org"], service_env)
    assert moved.exit_code == 0, moved.output
    assert_problem(api.post("/v1/scans", json={"objects": objects, "callback_url": "https://hooks.example.com/in"},
                            headers=headers), 422)
    both = _cli(["clients", "set", str(client_id), "--callback-host", "a.example", "--any-callback-host"], service_env)
    assert both.exit_code == 2 and "contradict" in both.output
    cleared = _cli(["clients", "set", str(client_id), "--any-callback-host"], service_env)
    assert cleared.exit_code == 0, cleared.output
    listed = {c["id"]: c for c in json.loads(_cli(["clients", "list", "--json"], service_env).stdout)}
    assert listed[str(client_id)]["callback_hosts"] is None
    anywhere = api.post(
        "/v1/scans", json={"objects": objects, "callback_url": "https://victim.example.net/x"}, headers=headers
    )
    assert anywhere.status_code == 202, anywhere.text
