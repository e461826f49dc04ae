"""The HTTP API against real PostgreSQL and Redis: what a producer sees, and what lands in the queue."""

from __future__ import annotations

import json
import re
import socket
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from api_stub.app import create_app
from worker.celery_app import BULK_QUEUE, REALTIME_QUEUE
from worker.clients import create_client
from worker.db import get_sessionmaker
from worker.models import Image, Scan, utcnow

PROBLEM = "application/problem+json"


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def new_client(sessions: sessionmaker[Session]) -> Callable[..., tuple[uuid.UUID, dict[str, str]]]:
    """Create an API client; returns its id and the headers that authenticate as it."""

    def make(name: str = "producer", *, disabled: bool = False) -> tuple[uuid.UUID, dict[str, str]]:
        with sessions.begin() as session:
            created = create_client(session, name, all_buckets=True)
            if disabled:
                created.client.disabled_at = utcnow()
            client_id = created.client.id
        return client_id, {"Authorization": f"Bearer {created.api_key}"}

    return make


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status
    assert body["type"] and body["title"] and body["detail"]
    return body


def image_rows(sessions: sessionmaker[Session], **where: Any) -> list[Image]:
    with sessions() as session:
        stmt = select(Image).filter_by(**where).order_by(Image.key)
        return list(session.scalars(stmt))


# ------------------------------------------------------------------ POST /v1/scans


def test_post_scan_writes_queued_rows_and_one_message_per_image(api, new_client, sessions, broker) -> None:
    client_id, headers = new_client()
    objects = [
        {"bucket": "uploads", "key": "a.jpg"},
        {"bucket": "uploads", "key": "b.png", "version_id": "v2"},
    ]

    response = api.post("/v1/scans", json={"objects": objects, "threshold": 0.7}, headers=headers)

    assert response.status_code == 202, response.text
    body = response.json()
    assert body["priority"] == "realtime"
    assert response.headers["location"] == body["status_url"]
    assert body["status_url"].endswith(f"/v1/scans/{body['id']}")
    assert [(i["bucket"], i["key"], i["version_id"]) for i in body["images"]] == [
        ("uploads", "a.jpg", None),
        ("uploads", "b.png", "v2"),
    ]
    rows = image_rows(sessions, scan_id=uuid.UUID(body["id"]))
    assert {str(r.id) for r in rows} == {i["id"] for i in body["images"]}
    assert {(r.state, r.client_id, r.threshold) for r in rows} == {("queued", client_id, 0.7)}
    assert broker.llen(REALTIME_QUEUE) == 2
    assert broker.llen(BULK_QUEUE) == 0


def test_bulk_priority_goes_to_the_bulk_queue_and_repeats_share_an_image(api, new_client, broker) -> None:
    _, headers = new_client()
    objects = [
        {"bucket": "bkt", "key": "x.jpg"},
        {"bucket": "bkt", "key": "y.jpg"},
        {"bucket": "bkt", "key": "x.jpg"},
    ]

    body = api.post("/v1/scans", json={"objects": objects, "priority": "bulk"}, headers=headers).json()

    assert body["priority"] == "bulk"
    ids = [i["id"] for i in body["images"]]
    assert ids[0] == ids[2] != ids[1]
    assert broker.llen(BULK_QUEUE) == 1  # one chunk of the two images
    assert broker.llen(REALTIME_QUEUE) == 0


def test_same_idempotency_key_and_body_returns_the_same_scan(api, new_client, sessions, broker) -> None:
    client_id, headers = new_client()
    request = {
        "objects": [
            {"bucket": "bkt", "key": "1.jpg"},
            {"bucket": "bkt", "key": "2.jpg"},
            {"bucket": "bkt", "key": "3.jpg"},
        ],
        "metadata": {"user": "u1"},
        "idempotency_key": "upload-42",
    }
    first = api.post("/v1/scans", json=request, headers=headers)
    assert first.status_code == 202
    assert broker.llen(REALTIME_QUEUE) == 3

    again = api.post("/v1/scans", json=request, headers=headers)

    assert again.status_code == 202
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert len(image_rows(sessions, client_id=client_id)) == 3
    assert broker.llen(REALTIME_QUEUE) == 3

    changed = api.post("/v1/scans", json={**request, "metadata": {"user": "u2"}}, headers=headers)
    problem = assert_problem(changed, 422)
    assert "upload-42" in problem["detail"]
    assert problem["idempotency_key"] == "upload-42"
    assert problem["type"].endswith("idempotency-key-reused")
    assert len(image_rows(sessions, client_id=client_id)) == 3


def test_idempotency_key_header_works_like_the_field(api, new_client) -> None:
    _, headers = new_client()
    request = {"objects": [{"bucket": "bkt", "key": "h.jpg"}]}
    first = api.post("/v1/scans", json=request, headers={**headers, "Idempotency-Key": "k1"})
    again = api.post("/v1/scans", json={**request, "idempotency_key": "k1"}, headers=headers)
    assert again.json()["id"] == first.json()["id"]
    mismatch = api.post(
        "/v1/scans", json={**request, "idempotency_key": "k1"}, headers={**headers, "Idempotency-Key": "k2"}
    )
    assert_problem(mismatch, 422)


def test_a_broker_outage_does_not_fail_the_request(service_settings, new_client, sessions) -> None:
    # Rate limits fail open here: the default (fail closed) answers 503 instead, see test_tenancy.py.
    settings = service_settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{_closed_port()}/0", "api_rate_limit_fail_open": True}
    )
    client_id, headers = new_client()
    with TestClient(create_app(settings)) as api:
        response = api.post(
            "/v1/scans", json={"objects": [{"bucket": "bkt", "key": "later.jpg"}]}, headers=headers
        )
        assert response.status_code == 202, response.text
        # The rows are the truth: the sweeper publishes them once the broker is back.
        assert [r.state for r in image_rows(sessions, client_id=client_id)] == ["queued"]
        ready = assert_problem(api.get("/readyz"), 503)
        assert ready["checks"] == {"database": "ok", "broker": "unavailable"}


# ------------------------------------------------------------------ validation


def _objects(n: int) -> list[dict[str, str]]:
    return [{"bucket": "bkt", "key": f"k{i}.jpg"} for i in range(n)]


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"objects": []}, "objects", "at least 1"),
        ({"threshold": 1.5}, "threshold", "less than or equal to 1"),
        ({"callback_url": "ftp://hooks.example.com/x"}, "callback_url", "https"),
        ({"callback_url": "http://hooks.example.com/x"}, "callback_url", "https"),
        ({"callback_url": "https://user:pw@hooks.example.com/x"}, "callback_url", "credentials"),
        ({"callback_url": "https://bad host/x"}, "callback_url", "host"),
        ({"metadata": {"blob": "x" * 5000}}, "metadata", "at most 4096"),
        ({"priority": "urgent"}, "priority", "realtime"),
        ({"objects": [{"bucket": "bkt", "key": "folder/"}]}, "key", "folder"),
        ({"unknown": 1}, "unknown", "not permitted"),
    ],
)
def test_invalid_requests_are_422_naming_the_field(api, new_client, broker, change, field, message) -> None:
    _, headers = new_client()
    response = api.post("/v1/scans", json={"objects": _objects(1), **change}, headers=headers)
    problem = assert_problem(response, 422)
    assert any(err["loc"][-1] == field and message in err["msg"] for err in problem["errors"]), problem
    assert field in problem["detail"]
    assert broker.llen(REALTIME_QUEUE) == 0


def test_http_callbacks_are_accepted_where_the_operator_allows_them(
    service_settings, celery_app, new_client
) -> None:
    _, headers = new_client()
    settings = service_settings.model_copy(update={"webhook_allow_http": True})
    with TestClient(create_app(settings, celery=celery_app)) as api:
        response = api.post(
            "/v1/scans",
            json={"objects": _objects(1), "callback_url": "http://hooks.internal/x"},
            headers=headers,
        )
        assert response.status_code == 202, response.text
        # Port 80 for http, 443 for https: any other port only inside SYNTHGUARD_WEBHOOK_ALLOWED_NETWORKS.
        other_port = api.post(
            "/v1/scans",
            json={"objects": _objects(1), "callback_url": "http://hooks.internal:8080/x"},
            headers=headers,
        )
        assert other_port.status_code == 422, other_port.text


def test_too_many_objects_and_too_large_bodies_are_413(api, new_client, broker) -> None:
    _, headers = new_client()
    problem = assert_problem(api.post("/v1/scans", json={"objects": _objects(1001)}, headers=headers), 413)
    assert "at most 1000" in problem["detail"] and "1001" in problem["detail"]

    huge = b'{"objects": [' + b'{"bucket": "bkt", "key": "k"},' * 60_000 + b'{"bucket": "bkt", "key": "k"}]}'
    problem = assert_problem(
        api.post("/v1/scans", content=huge, headers={**headers, "Content-Type": "application/json"}), 413
    )
    assert "larger than" in problem["detail"]
    assert broker.llen(REALTIME_QUEUE) == 0


# ------------------------------------------------------------------ authentication


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer sg_not-a-real-key", "Bearer", "Basic dXNlcjpwYXNz", "sg_missing-scheme"],
)
def test_requests_without_a_valid_key_are_401(api, authorization) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for response in (
        api.post("/v1/scans", json={"objects": _objects(1)}, headers=headers),
        api.get(f"/v1/scans/{uuid.uuid4()}", headers=headers),
    ):
        assert_problem(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")
        token = authorization.split()[-1] if authorization else "Bearer"
        if token != "Bearer":
            assert token not in response.text  # the key is never echoed


def test_a_disabled_client_is_401(api, new_client) -> None:
    _, headers = new_client(disabled=True)
    problem = assert_problem(api.post("/v1/scans", json={"objects": _objects(1)}, headers=headers), 401)
    assert "disabled" in problem["detail"]


def test_clients_cannot_see_each_others_scans_or_images(api, new_client) -> None:
    _, alice = new_client("alice")
    _, bob = new_client("bob")
    scan = api.post("/v1/scans", json={"objects": _objects(1)}, headers=alice).json()
    image_id = scan["images"][0]["id"]
    assert api.get(f"/v1/scans/{scan['id']}", headers=alice).status_code == 200
    assert api.get(f"/v1/images/{image_id}", headers=alice).status_code == 200

    answers = [
        api.get(f"/v1/scans/{scan['id']}", headers=bob),
        api.get(f"/v1/scans/{uuid.uuid4()}", headers=bob),
        api.get("/v1/scans/not-a-uuid", headers=bob),
    ]
    details = {assert_problem(a, 404)["detail"] for a in answers}
    assert len(details) == 1  # the other client's scan reads exactly like an unknown one
    assert_problem(api.get(f"/v1/images/{image_id}", headers=bob), 404)
    assert_problem(api.get("/v1/images/12345", headers=bob), 404)


# ------------------------------------------------------------------ GET results


def test_get_scan_reflects_image_states(api, new_client, sessions) -> None:
    _, headers = new_client()
    created = api.post(
        "/v1/scans",
        json={"objects": _objects(3), "threshold": 0.8, "metadata": {"flow": "kyc"}},
        headers=headers,
    ).json()
    ids = {i["key"]: uuid.UUID(i["id"]) for i in created["images"]}
    url = f"/v1/scans/{created['id']}"

    fresh = api.get(url, headers=headers).json()
    assert fresh["state"] == "queued"
    assert fresh["counts"] == {"queued": 3, "processing": 0, "done": 0, "failed": 0, "flagged": 0}
    assert fresh["metadata"] == {"flow": "kyc"} and fresh["threshold"] == 0.8 and fresh["image_count"] == 3

    now = utcnow()
    with sessions.begin() as session:
        session.execute(
            update(Image)
            .where(Image.id == ids["k0.jpg"])
            .values(
                state="done",
                score=0.93,
                flagged=True,
                flagged_by=["score"],
                model_name="tf_mobilenetv3_large_100",
                model_version="sha256:abc",
                attempts=1,
                completed_at=now,
                etag="e0",
            )
        )
        session.execute(update(Image).where(Image.id == ids["k1.jpg"]).values(state="processing", attempts=1))
    partial = api.get(url, headers=headers).json()
    assert partial["state"] == "processing"
    assert partial["counts"] == {"queued": 1, "processing": 1, "done": 1, "failed": 0, "flagged": 1}
    done = next(i for i in partial["images"] if i["key"] == "k0.jpg")
    assert done | {"created_at": None} == {
        "id": str(ids["k0.jpg"]),
        "bucket": "bkt",
        "key": "k0.jpg",
        "version_id": None,
        "etag": "e0",
        "state": "done",
        "score": 0.93,
        "flagged": True,
        "flagged_by": ["score"],
        "cached_from": None,
        "pdq": None,
        "pdq_quality": None,
        "known_match": None,
        "generator": None,
        "quality": None,
        "frames": None,
        "threshold": 0.8,
        "model_name": "tf_mobilenetv3_large_100",
        "model_version": "sha256:abc",
        "provenance": None,
        "error_code": None,
        "error_message": None,
        "attempts": 1,
        "created_at": None,
        "completed_at": done["completed_at"],
    }
    assert done["completed_at"] is not None

    with sessions.begin() as session:
        session.execute(
            update(Image).where(Image.id == ids["k1.jpg"]).values(state="done", score=0.1, flagged=False)
        )
        session.execute(
            update(Image)
            .where(Image.id == ids["k2.jpg"])
            .values(state="failed", error_code="object_not_found", error_message="no such key")
        )
    final = api.get(url, headers=headers).json()
    assert final["state"] == "completed"
    assert final["counts"] == {"queued": 0, "processing": 0, "done": 2, "failed": 1, "flagged": 1}

    page = api.get(url, params={"limit": 1, "offset": 2}, headers=headers).json()
    assert [i["key"] for i in page["images"]] == ["k2.jpg"]
    assert page["counts"] == final["counts"]

    image = api.get(f"/v1/images/{ids['k2.jpg']}", headers=headers).json()
    assert image["scan_id"] == created["id"]
    assert (image["state"], image["error_code"], image["score"]) == ("failed", "object_not_found", None)


# ------------------------------------------------------------------ S3 events


def _record(
    key: str, *, name: str = "ObjectCreated:Put", bucket: str = "photos", **obj: Any
) -> dict[str, Any]:
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventName": name,
        "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 10, "eTag": "abc", **obj}},
    }


def test_s3_event_is_queued_once_even_when_delivered_twice(api, new_client, sessions, broker) -> None:
    client_id, headers = new_client()
    event = {
        "Records": [
            _record("photos/my+summer%C3%A9.jpg", sequencer="0A1"),
            _record("photos/old.jpg", name="ObjectRemoved:Delete"),
            _record("photos/other.jpg", name="s3:ObjectCreated:CompleteMultipartUpload", versionId="v1"),
            _record("photos/albums/", name="ObjectCreated:Put"),
        ]
    }

    first = api.post("/v1/s3-events", json=event, headers=headers)

    assert first.status_code == 202, first.text
    body = first.json()
    assert body["ignored"] == 2
    assert [(i["key"], i["version_id"], i["duplicate"]) for i in body["images"]] == [
        ("photos/my summeré.jpg", None, False),
        ("photos/other.jpg", "v1", False),
    ]
    rows = image_rows(sessions, client_id=client_id)
    assert [(r.bucket, r.key, r.state) for r in rows] == [
        ("photos", "photos/my summeré.jpg", "queued"),
        ("photos", "photos/other.jpg", "queued"),
    ]
    with sessions() as session:
        scan = session.get(Scan, uuid.UUID(body["scan_id"]))
        assert (scan.image_count, scan.pending_count, scan.origin) == (2, 2, "s3-event")
    assert broker.llen(REALTIME_QUEUE) == 2

    again = api.post("/v1/s3-events", json=event, headers=headers)

    assert again.status_code == 200
    assert again.json()["scan_id"] is None
    assert [(i["id"], i["duplicate"]) for i in again.json()["images"]] == [
        (i["id"], True) for i in body["images"]
    ]
    assert len(image_rows(sessions, client_id=client_id)) == 2
    assert broker.llen(REALTIME_QUEUE) == 2

    # A new write of the same key is a new event; the known one in the same body is not.
    rewrite = {"Records": [_record("photos/my+summer%C3%A9.jpg", sequencer="0A2"), event["Records"][0]]}
    third = api.post("/v1/s3-events", json=rewrite, headers=headers).json()
    assert [i["duplicate"] for i in third["images"]] == [False, True]
    with sessions() as session:
        assert session.get(Scan, uuid.UUID(third["scan_id"])).image_count == 1
    assert broker.llen(REALTIME_QUEUE) == 3


def test_s3_event_dedupe_is_per_client(api, new_client, sessions) -> None:
    event = {"Records": [_record("shared.jpg", sequencer="1")]}
    for name in ("alice", "bob"):
        client_id, headers = new_client(name)
        body = api.post("/v1/s3-events", json=event, headers=headers).json()
        assert [i["duplicate"] for i in body["images"]] == [False]
        assert len(image_rows(sessions, client_id=client_id)) == 1


def test_s3_event_dedupe_works_on_sqlite(settings_factory, sqlite_url, redis_url, broker) -> None:
    from worker.db import ensure_schema

    settings = settings_factory(database_url=sqlite_url, broker_url=redis_url)
    sessions = get_sessionmaker(sqlite_url)
    ensure_schema(sessions.kw["bind"])
    with sessions.begin() as session:
        created = create_client(session, "embedded", all_buckets=True)
    headers = {"Authorization": f"Bearer {created.api_key}"}
    event = {"Records": [_record("a.jpg", sequencer="1"), _record("b.jpg", sequencer="1")]}
    with TestClient(create_app(settings)) as api:
        first = api.post("/v1/s3-events", json=event, headers=headers)
        again = api.post("/v1/s3-events", json=event, headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert [i["id"] for i in again.json()["images"]] == [i["id"] for i in first.json()["images"]]
    assert len(image_rows(sessions)) == 2
    assert broker.llen(REALTIME_QUEUE) == 2


def test_s3_test_event_is_accepted_and_queues_nothing(api, new_client, broker) -> None:
    _, headers = new_client()
    test_event = {
        "Service": "Amazon S3",
        "Event": "s3:TestEvent",
        "Time": "2026-01-01T00:00:00.000Z",
        "Bucket": "photos",
        "RequestId": "R",
        "HostId": "H",
    }
    response = api.post("/v1/s3-events", json=test_event, headers=headers)
    assert response.status_code == 200
    assert response.json() == {"scan_id": None, "images": [], "ignored": 0}
    assert broker.llen(REALTIME_QUEUE) == 0


def test_s3_event_without_an_object_key_is_422(api, new_client) -> None:
    _, headers = new_client()
    event = {"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {}}}]}
    problem = assert_problem(api.post("/v1/s3-events", json=event, headers=headers), 422)
    assert problem["errors"][0]["loc"][:3] == ["body", "Records", 0]


def test_s3_event_in_an_sns_envelope_is_queued_like_the_bare_notification(
    api, new_client, sessions, broker
) -> None:
    client_id, headers = new_client()
    notification = {"Records": [_record("inbox/a+b%2B.jpg", sequencer="0B7")]}
    envelope = {
        "Type": "Notification",
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": "arn:aws:sns:eu-west-1:123456789012:uploads",
        "Subject": "Amazon S3 Notification",
        "Message": json.dumps(notification),
        "Timestamp": "2026-12-01T00:00:00.000Z",
    }

    wrapped = api.post("/v1/s3-events", json=envelope, headers=headers)

    assert wrapped.status_code == 202, wrapped.text
    assert [(i["bucket"], i["key"]) for i in wrapped.json()["images"]] == [("photos", "inbox/a b+.jpg")]
    assert [r.key for r in image_rows(sessions, client_id=client_id)] == ["inbox/a b+.jpg"]
    assert broker.llen(REALTIME_QUEUE) == 1
    # The same event sent bare is recognised as the one already queued.
    bare = api.post("/v1/s3-events", json=notification, headers=headers)
    assert bare.status_code == 200
    assert [i["id"] for i in bare.json()["images"]] == [i["id"] for i in wrapped.json()["images"]]


def _sqs_message(body: dict[str, Any], number: int) -> dict[str, Any]:
    """One message of an SQS batch as a Lambda receives it."""
    return {
        "messageId": f"059f36b4-87a3-44ab-83d2-66197554750{number}",
        "body": json.dumps(body),
        "attributes": {"ApproximateReceiveCount": "1"},
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:eu-west-1:123456789012:uploads",
    }


def test_an_sqs_batch_forwarded_whole_queues_the_objects_its_messages_carry(
    api, new_client, sessions, broker
) -> None:
    client_id, headers = new_client()
    direct = {"Records": [_record("q/direct.jpg", sequencer="01")]}
    through_sns = {"Type": "Notification", "Message": json.dumps({"Records": [_record("q/sns.jpg", sequencer="02")]})}
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "photos"}
    batch = {"Records": [_sqs_message(m, n) for n, m in enumerate((direct, test_event, through_sns))]}

    response = api.post("/v1/s3-events", json=batch, headers=headers)

    assert response.status_code == 202, response.text
    assert response.json()["ignored"] == 0
    assert [i["key"] for i in response.json()["images"]] == ["q/direct.jpg", "q/sns.jpg"]
    assert [r.key for r in image_rows(sessions, client_id=client_id)] == ["q/direct.jpg", "q/sns.jpg"]
    assert broker.llen(REALTIME_QUEUE) == 2
    # SQS delivers at least once: the same batch again queues nothing new.
    again = api.post("/v1/s3-events", json=batch, headers=headers)
    assert again.status_code == 200
    assert [i["duplicate"] for i in again.json()["images"]] == [True, True]


def _eventbridge_object_created() -> dict[str, Any]:
    return {
        "version": "0",
        "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": "Object Created",
        "source": "aws.s3",
        "detail": {"bucket": {"name": "photos"}, "object": {"key": "a.jpg", "etag": "abc"}},
    }


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (_eventbridge_object_created(), "EventBridge event"),
        (
            {
                "Type": "SubscriptionConfirmation",
                "SubscribeURL": "https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription",
                "Message": "You have chosen to subscribe to the topic",
            },
            "subscription confirmation",
        ),
        ({"Type": "Notification", "Message": "not json"}, "not an S3 event notification"),
        ({"Type": "Notification", "Message": json.dumps(_eventbridge_object_created())}, "SNS notification"),
        ({"records": [_record("a.jpg")]}, "no `Records` list"),
        ({}, "no `Records` list"),
        (
            {"Records": [_sqs_message({"Records": [_record("a.jpg")]}, 0), _sqs_message(_eventbridge_object_created(), 1)]},
            "Records[1] is an SQS message whose body is an EventBridge event",
        ),
    ],
    ids=["eventbridge", "sns-subscription", "sns-not-json", "sns-eventbridge", "misspelt", "empty", "sqs-eventbridge"],
)
def test_a_body_that_is_no_s3_notification_is_422_and_queues_nothing(
    api, new_client, sessions, broker, body: dict[str, Any], said: str
) -> None:
    client_id, headers = new_client()

    problem = assert_problem(api.post("/v1/s3-events", json=body, headers=headers), 422)

    assert said in problem["detail"]
    assert problem["errors"][0]["loc"] == ["body"]
    assert image_rows(sessions, client_id=client_id) == []
    assert broker.llen(REALTIME_QUEUE) == 0


# ------------------------------------------------------------------ operations


def test_healthz_and_readyz(api) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}


def test_database_outage_is_503_without_leaking_the_url(service_settings, celery_app) -> None:
    url = f"postgresql+psycopg://synthguard:s3cret-pw@127.0.0.1:{_closed_port()}/synthguard"
    settings = service_settings.model_copy(update={"database_url": url})
    with TestClient(create_app(settings, celery=celery_app)) as api:
        down = api.post("/v1/scans", json={"objects": _objects(1)}, headers={"Authorization": "Bearer sg_x"})
        problem = assert_problem(down, 503)
        assert "Retry-After" in down.headers
        assert "s3cret" not in down.text and str(settings.database_url) not in down.text
        ready = assert_problem(api.get("/readyz"), 503)
        assert ready["checks"] == {"database": "unavailable", "broker": "ok"}
        assert "database" in problem["detail"]


def _metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def test_metrics_count_requests_by_route_template(api, new_client) -> None:
    _, headers = new_client()
    before = api.get("/metrics").text

    scan = api.post("/v1/scans", json={"objects": _objects(2), "priority": "bulk"}, headers=headers).json()
    api.get(f"/v1/scans/{scan['id']}", headers=headers)

    after = api.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text

    def delta(name: str, **labels: str) -> float:
        return _metric(text, name, **labels) - _metric(before, name, **labels)

    assert delta("synthguard_scans_created_total", priority="bulk") == 1
    assert delta("synthguard_images_enqueued_total", priority="bulk") == 2
    assert delta("synthguard_api_requests_total", method="POST", route="/v1/scans", status="202") == 1
    assert (
        delta("synthguard_api_requests_total", method="GET", route="/v1/scans/{scan_id}", status="200") == 1
    )
    assert delta("synthguard_api_request_duration_seconds_count", method="POST", route="/v1/scans") == 1
    assert scan["id"] not in text  # raw paths never become labels


def test_rate_limit_answers_429_with_retry_after(service_settings, celery_app, new_client) -> None:
    limit = 3
    settings = service_settings.model_copy(update={"api_rate_limit_per_minute": limit})
    _, alice = new_client("alice")
    _, bob = new_client("bob")
    with TestClient(create_app(settings, celery=celery_app)) as api:
        statuses = [api.get(f"/v1/scans/{uuid.uuid4()}", headers=alice).status_code for _ in range(limit)]
        assert statuses == [404] * limit
        # A minute boundary may fall between two requests and reset the count once, never twice.
        limited = None
        for _ in range(limit + 1):
            response = api.get(f"/v1/scans/{uuid.uuid4()}", headers=alice)
            if response.status_code == 429:
                limited = response
                break
        assert limited is not None
        problem = assert_problem(limited, 429)
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert str(limit) in problem["detail"]
        assert api.get(f"/v1/scans/{uuid.uuid4()}", headers=bob).status_code == 404  # per client


def test_unknown_routes_are_problems_too(api) -> None:
    assert_problem(api.get("/v1/nothing-here"), 404)
    assert_problem(api.delete("/v1/scans"), 405)


def test_openapi_documents_every_endpoint_and_the_bearer_scheme(api) -> None:
    schema = api.get("/openapi.json").json()
    assert schema["info"]["title"] and schema["info"]["description"]
    from worker import __version__

    assert schema["info"]["version"] == __version__
    expected = {
        ("post", "/v1/scans"),
        ("get", "/v1/scans/{scan_id}"),
        ("get", "/v1/images/{image_id}"),
        ("post", "/v1/s3-events"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
    }
    found = {(method, path) for path, ops in schema["paths"].items() for method in ops}
    assert expected <= found
    assert schema["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for method, path in expected:
        operation = schema["paths"][path][method]
        assert operation["summary"] and operation["description"], (method, path)
        secured = operation.get("security") == [{"bearerAuth": []}]
        assert secured == path.startswith("/v1/"), (method, path)
        for code, response in operation["responses"].items():
            if code.startswith(("4", "5")):
                assert list(response["content"]) == [PROBLEM], (method, path, code)
    for name, component in schema["components"]["schemas"].items():
        assert component.get("description"), name
        for field, spec in component.get("properties", {}).items():
            assert spec.get("description"), f"{name}.{field}"
