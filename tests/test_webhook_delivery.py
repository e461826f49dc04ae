"""Webhooks end to end: a real worker scores and flags, the outbox row commits with the
score, and a real receiver verifies every delivery with the ``standardwebhooks`` package."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis
import standardwebhooks
from click.testing import CliRunner
from sqlalchemy import select

from conftest import wait_until
from worker.clients import create_client
from worker.db import get_sessionmaker
from worker.models import ApiClient, WebhookDelivery
from worker.queueing import enqueue, publish

SMALL_IMAGE = "real/earth_apollo17.jpg"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    verified_with: list[str]


@dataclass
class Receiver:
    """An HTTP endpoint that answers as scripted and verifies signatures like a client would."""

    secrets: list[str] = field(default_factory=list)
    # Answers in order per event type ("*": any), then 200.
    script: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    hold: threading.Event | None = None  # when set, the first request waits for it
    received: list[Received] = field(default_factory=list)
    url: str = ""

    def answer(self, event_type: str) -> tuple[int, dict[str, str]]:
        for key in (event_type, "*"):
            if self.script.get(key):
                return self.script[key].pop(0)
        return 200, {}

    def verified(self) -> list[Received]:
        return [r for r in self.received if r.verified_with]


@contextmanager
def running_receiver() -> Iterator[Receiver]:
    """A :class:`Receiver` listening on 127.0.0.1 (a free port) until the block ends."""
    state = Receiver()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            verified = []
            for secret in state.secrets:
                try:
                    standardwebhooks.Webhook(secret).verify(body, headers)
                    verified.append(secret)
                except standardwebhooks.WebhookVerificationError:
                    pass
            with lock:
                state.received.append(Received(headers, body, verified))
                first = len(state.received) == 1
                status, extra = state.answer(json.loads(body or b"{}").get("type", ""))
            if first and state.hold is not None:
                state.hold.wait(30)
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        if state.hold is not None:
            state.hold.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as state:
        yield state


WEBHOOK_ENV = {
    "webhook_allow_http": "true",
    "webhook_allowed_networks": "127.0.0.1/32",
    "webhook_retry_schedule_s": "0.2,0.2,0.2,0.2",
    "webhook_timeout_s": "1",
    "threshold": "0.0",  # every scored image is flagged
}


@pytest.fixture
def hooked(pg_url, receiver, s3_client, bucket, corpus_dir):  # type: ignore[no-untyped-def]
    """A client whose webhook URL is the receiver, and an object to score."""
    sessions = get_sessionmaker(pg_url)
    with sessions.begin() as session:
        new = create_client(session, "hooked", all_buckets=True, webhook_url=receiver.url)
    receiver.secrets = [new.webhook_secret]
    s3_client.put_object(Bucket=bucket, Key="a.jpg", Body=(corpus_dir / SMALL_IMAGE).read_bytes())
    return new


def _settings(service_settings):  # type: ignore[no-untyped-def]
    return service_settings.model_copy(update={"threshold": 0.0})


def _deliveries(pg_url: str, hooked: Any, **where: Any) -> list[WebhookDelivery]:
    """This test's deliveries (the database is shared by the whole session)."""
    with get_sessionmaker(pg_url)() as session:
        query = (
            select(WebhookDelivery)
            .filter_by(client_id=hooked.client.id, **where)
            .order_by(WebhookDelivery.created_at)
        )
        return list(session.scalars(query))


def test_flagged_image_arrives_signed_once_despite_three_failures(
    hooked, receiver, bucket, service_settings, celery_app, start_service, pg_url
) -> None:
    receiver.script = {"image.flagged": [(500, {}), (500, {}), (500, {})]}
    start_service("worker", **WEBHOOK_ENV)
    queued = enqueue(
        [(bucket, "a.jpg")],
        client_id=hooked.client.id,
        metadata={"ticket": "T-1"},
        webhook_events=["image.flagged", "scan.completed"],
        settings=_settings(service_settings),
        app=celery_app,
    )
    wait_until(lambda: len(_deliveries(pg_url, hooked, state="delivered")) == 2, message="both events delivered")

    flagged = [r for r in receiver.received if json.loads(r.body)["type"] == "image.flagged"]
    assert len(flagged) == 4  # three 500s, then the 200
    assert all(r.verified_with == [hooked.webhook_secret] for r in flagged)
    assert len({r.headers["webhook-id"] for r in flagged}) == 1  # one logical event
    event = json.loads(flagged[-1].body)
    data = event["data"]
    assert data["image_id"] == str(queued.image_ids[0]) and data["scan_id"] == str(queued.scan_id)
    assert (data["bucket"], data["key"]) == (bucket, "a.jpg") and data["etag"]
    assert data["score"] >= data["threshold"] == 0.0
    assert data["model"]["version"].startswith("sha256:") and data["metadata"] == {"ticket": "T-1"}
    assert set(event) == {"type", "timestamp", "data"}

    (row,) = _deliveries(pg_url, hooked, event_type="image.flagged")
    assert row.attempts == 4 and [a["status"] for a in row.attempt_log] == [500, 500, 500, 200]
    (done,) = [r for r in receiver.received if json.loads(r.body)["type"] == "scan.completed"]
    assert json.loads(done.body)["data"]["counts"]["done"] == 1


def test_gone_disables_the_endpoint_and_the_client_sees_why(
    hooked, receiver, bucket, service_settings, celery_app, start_service, pg_url
) -> None:
    from fastapi.testclient import TestClient

    from api_stub.app import create_app

    receiver.script = {"*": [(410, {})]}
    start_service("worker", **WEBHOOK_ENV)
    enqueue(
        [(bucket, "a.jpg")], client_id=hooked.client.id, settings=_settings(service_settings), app=celery_app
    )
    wait_until(lambda: _deliveries(pg_url, hooked, state="failed"), message="the delivery to fail")
    assert len(receiver.received) == 1  # 410 is not retried

    with TestClient(create_app(service_settings, celery=celery_app)) as http:
        listing = http.get(
            "/v1/webhooks/deliveries", headers={"Authorization": f"Bearer {hooked.api_key}"}
        ).json()
    assert "410" in listing["endpoint"]["disabled_reason"]
    assert listing["deliveries"][0]["attempt_log"][0]["status"] == 410

    # Later events for a disabled endpoint are kept, marked, and not sent.
    enqueue(
        [(bucket, "a.jpg")], client_id=hooked.client.id, settings=_settings(service_settings), app=celery_app
    )
    wait_until(lambda: len(_deliveries(pg_url, hooked)) == 2, message="the second event recorded")
    assert "endpoint disabled" in _deliveries(pg_url, hooked)[-1].last_error
    assert len(receiver.received) == 1


def test_a_slow_endpoint_times_out_and_is_retried(
    hooked, receiver, bucket, service_settings, celery_app, start_service, pg_url
) -> None:
    receiver.hold = threading.Event()
    start_service("worker", **WEBHOOK_ENV)
    enqueue(
        [(bucket, "a.jpg")], client_id=hooked.client.id, settings=_settings(service_settings), app=celery_app
    )
    wait_until(
        lambda: any(row.attempt_log and row.attempt_log[0]["error"] for row in _deliveries(pg_url, hooked)),
        message="the first attempt to time out",
    )
    receiver.hold.set()
    wait_until(lambda: _deliveries(pg_url, hooked, state="delivered"), message="the retry to succeed")
    (row,) = _deliveries(pg_url, hooked)
    assert "timeout" in row.attempt_log[0]["error"] and row.attempt_log[0]["status"] is None
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1


def test_retry_after_is_honoured(
    hooked, receiver, bucket, service_settings, celery_app, start_service, pg_url
) -> None:
    receiver.script = {"*": [(503, {"Retry-After": "2"})]}
    start_service("worker", **WEBHOOK_ENV)
    enqueue(
        [(bucket, "a.jpg")], client_id=hooked.client.id, settings=_settings(service_settings), app=celery_app
    )
    wait_until(lambda: _deliveries(pg_url, hooked, state="delivered"), message="delivery after Retry-After")
    (row,) = _deliveries(pg_url, hooked)
    from datetime import datetime

    first, second = (datetime.fromisoformat(a["at"]) for a in row.attempt_log)
    # The schedule says 0.2 s; the endpoint asked for 2 s, and got at least that.
    assert (second - first).total_seconds() >= 2


def test_killed_between_score_and_send_the_webhook_still_arrives_once(
    hooked, receiver, bucket, service_settings, celery_app, start_service, pg_url, redis_url
) -> None:
    # This worker scores but never sends: it does not consume the webhooks queue.
    scorer = start_service("worker", args=("--queues=synthguard.realtime",), stale_after_s=1, **WEBHOOK_ENV)
    enqueue(
        [(bucket, "a.jpg")], client_id=hooked.client.id, settings=_settings(service_settings), app=celery_app
    )
    wait_until(lambda: _deliveries(pg_url, hooked), message="the outbox row committed with the score")
    scorer.signal(signal.SIGKILL)
    scorer.wait()
    redis.Redis.from_url(redis_url).flushdb()  # and the delivery's message is lost too
    assert receiver.received == []

    start_service("worker", stale_after_s=1, **WEBHOOK_ENV)
    start_service("beat", stale_after_s=1, sweep_interval_s=0.5)
    wait_until(lambda: _deliveries(pg_url, hooked, state="delivered"), message="the sweeper to send it")
    assert len(receiver.verified()) == 1


def test_a_redelivered_image_task_sends_no_second_webhook(
    hooked, receiver, bucket, service_settings, celery_app, start_service, pg_url
) -> None:
    worker = start_service("worker", **WEBHOOK_ENV)
    queued = enqueue(
        [(bucket, "a.jpg")], client_id=hooked.client.id, settings=_settings(service_settings), app=celery_app
    )
    wait_until(lambda: _deliveries(pg_url, hooked, state="delivered"), message="the first webhook")
    publish(celery_app, queued.image_ids * 2, "realtime")
    wait_until(lambda: worker.log().count("score_image") >= 3 * 2, message="the redelivered tasks ran")
    assert len(_deliveries(pg_url, hooked)) == 1
    assert len(receiver.received) == 1


def test_rotated_secret_signs_with_both_during_the_overlap(
    hooked, receiver, bucket, service_settings, celery_app, start_service, pg_url
) -> None:
    from fastapi.testclient import TestClient

    from api_stub.app import create_app

    with TestClient(create_app(service_settings, celery=celery_app)) as http:
        rotated = http.post(
            "/v1/webhooks/secret/rotate", headers={"Authorization": f"Bearer {hooked.api_key}"}
        )
    new_secret = rotated.json()["webhook_secret"]
    assert new_secret.startswith("whsec_") and new_secret != hooked.webhook_secret
    receiver.secrets = [hooked.webhook_secret, new_secret]
    start_service("worker", **WEBHOOK_ENV)
    enqueue(
        [(bucket, "a.jpg")], client_id=hooked.client.id, settings=_settings(service_settings), app=celery_app
    )
    wait_until(lambda: _deliveries(pg_url, hooked, state="delivered"), message="the delivery")
    (got,) = receiver.received
    assert got.verified_with == [hooked.webhook_secret, new_secret]
    assert len(got.headers["webhook-signature"].split()) == 2


def test_replay_sends_the_same_event_again(
    hooked, receiver, bucket, service_settings, celery_app, start_service, pg_url
) -> None:
    from fastapi.testclient import TestClient

    from api_stub.app import create_app

    start_service("worker", **WEBHOOK_ENV)
    enqueue(
        [(bucket, "a.jpg")], client_id=hooked.client.id, settings=_settings(service_settings), app=celery_app
    )
    (row,) = wait_until(lambda: _deliveries(pg_url, hooked, state="delivered"), message="the delivery")
    with get_sessionmaker(pg_url).begin() as session:
        other = create_client(session, "other", all_buckets=True)
    with TestClient(create_app(service_settings, celery=celery_app)) as http:
        replay_url = f"/v1/webhooks/deliveries/{row.id}/replay"
        assert http.post(replay_url, headers={"Authorization": f"Bearer {other.api_key}"}).status_code == 404
        assert http.post(replay_url, headers={"Authorization": f"Bearer {hooked.api_key}"}).status_code == 202
    wait_until(lambda: len(receiver.received) == 2, message="the replay")
    assert (
        receiver.received[0].headers["webhook-id"]
        == receiver.received[1].headers["webhook-id"]
        == str(row.id)
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/h",
        "https://169.254.169.254/latest/meta-data",
        "https://10.0.0.1/h",
        "https://[::1]/h",
        "https://localhost/h",
    ],
)
def test_callbacks_aimed_inside_are_refused_with_a_clear_error(
    url, hooked, bucket, service_settings, celery_app, start_service, pg_url
) -> None:
    with get_sessionmaker(pg_url).begin() as session:
        session.get(ApiClient, hooked.client.id).webhook_url = url
    start_service("worker", threshold=0.0)  # no allow-list
    enqueue(
        [(bucket, "a.jpg")], client_id=hooked.client.id, settings=_settings(service_settings), app=celery_app
    )
    (row,) = wait_until(lambda: _deliveries(pg_url, hooked, state="failed"), message="the refusal")
    assert row.attempts == 1 and row.last_status is None
    assert "unsafe" in row.last_error.lower() or "refus" in row.last_error.lower(), row.last_error


def test_webhooks_test_command_sends_a_verifiable_event(receiver, service_env) -> None:
    from worker.cli import main
    from worker.clients import new_webhook_secret

    secret = new_webhook_secret()
    receiver.secrets = [secret]
    env = {
        **service_env,
        "SYNTHGUARD_WEBHOOK_ALLOW_HTTP": "true",
        "SYNTHGUARD_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.1/32",
    }
    result = CliRunner().invoke(
        main, ["webhooks", "test", receiver.url, "--secret", secret, "--json"], env=env
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] is True
    (got,) = receiver.received
    assert got.verified_with == [secret] and json.loads(got.body)["type"] == "webhook.test"

    refused = CliRunner().invoke(
        main, ["webhooks", "test", receiver.url], env={**service_env, "SYNTHGUARD_WEBHOOK_ALLOW_HTTP": "true"}
    )
    assert refused.exit_code == 1 and len(receiver.received) == 1
