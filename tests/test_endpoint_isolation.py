"""Tenant boundaries of webhooks: one failing URL disables only itself, secrets are sealed at rest,
and rotation keeps at most two secrets signing.

Real worker processes score and send; real receivers verify every request with the
``standardwebhooks`` package; the API is the real app in this process.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from test_webhook_delivery import SMALL_IMAGE, WEBHOOK_ENV, Receiver, running_receiver

from conftest import TEST_SECRET_KEY, wait_until
from worker import outbox
from worker.clients import NewClient, create_client
from worker.db import get_sessionmaker, upgrade
from worker.models import DELIVERY_PENDING, ApiClient, WebhookDelivery, WebhookEndpoint, utcnow
from worker.queueing import Enqueued, enqueue
from worker.secretbox import SecretBox
from worker.webhooks import AttemptResult

PROBLEM = "application/problem+json"


@pytest.fixture
def main_hook() -> Iterator[Receiver]:
    """The client's own webhook URL."""
    with running_receiver() as hook:
        yield hook


@pytest.fixture
def callback_hook() -> Iterator[Receiver]:
    """A URL that scans name as their ``callback_url``."""
    with running_receiver() as hook:
        yield hook


@pytest.fixture
def tenant(pg_url, main_hook, callback_hook, s3_client, bucket, corpus_dir) -> NewClient:  # type: ignore[no-untyped-def]
    """A client whose secret is sealed with the service's key, and an object to score."""
    with get_sessionmaker(pg_url).begin() as session:
        new = create_client(
            session, "tenant", all_buckets=True, webhook_url=main_hook.url, box=SecretBox([TEST_SECRET_KEY])
        )
    main_hook.secrets = callback_hook.secrets = [new.webhook_secret]
    s3_client.put_object(Bucket=bucket, Key="a.jpg", Body=(corpus_dir / SMALL_IMAGE).read_bytes())
    return new


def _auth(client: NewClient) -> dict[str, str]:
    return {"Authorization": f"Bearer {client.api_key}"}


def _scan(tenant: NewClient, bucket: str, settings: Any, app: Any, callback_url: str | None = None) -> Enqueued:
    """One flagged image (threshold 0), its image.flagged event to the callback URL or the webhook URL."""
    return enqueue(
        [(bucket, "a.jpg")],
        client_id=tenant.client.id,
        callback_url=callback_url,
        settings=settings.model_copy(update={"threshold": 0.0}),
        app=app,
    )


def _delivery(pg_url: str, scan: Enqueued, state: str | None = None) -> WebhookDelivery | None:
    """The scan's one delivery (in ``state``, if given), once it exists."""
    with get_sessionmaker(pg_url)() as session:
        row = session.scalar(select(WebhookDelivery).where(WebhookDelivery.scan_id == scan.scan_id))
    return row if row is not None and (state is None or row.state == state) else None


def _client_row(pg_url: str, tenant: NewClient) -> ApiClient:
    with get_sessionmaker(pg_url)() as session:
        row = session.get(ApiClient, tenant.client.id)
        assert row is not None
        return row


def _types(hook: Receiver) -> list[str]:
    return [json.loads(r.body)["type"] for r in hook.verified()]


# ------------------------------------------------------------ one URL, one state


def test_a_gone_callback_disables_only_itself_until_enabled(
    tenant, main_hook, callback_hook, bucket, service_settings, celery_app, start_service, pg_url, api
) -> None:
    callback_hook.script = {"*": [(410, {})]}
    start_service("worker", **WEBHOOK_ENV)
    gone = _scan(tenant, bucket, service_settings, celery_app, callback_url=callback_hook.url)
    wait_until(lambda: _delivery(pg_url, gone, "failed"), message="the callback to answer 410")
    assert len(callback_hook.received) == 1  # 410 is not retried

    # The client's own endpoint is untouched; the callback URL is disabled on its own.
    assert _client_row(pg_url, tenant).webhook_disabled_at is None
    listing = api.get("/v1/webhooks/deliveries", headers=_auth(tenant)).json()
    assert listing["endpoint"]["url"] == main_hook.url and listing["endpoint"]["disabled_at"] is None
    (disabled,) = listing["disabled_callbacks"]
    assert disabled["url"] == callback_hook.url and "410" in disabled["disabled_reason"]

    # image.flagged events for the client's webhook URL still go out, signed.
    main = _scan(tenant, bucket, service_settings, celery_app)
    wait_until(lambda: _delivery(pg_url, main, "delivered"), message="the webhook URL's delivery")
    (got,) = main_hook.received
    assert got.verified_with == [tenant.webhook_secret] and json.loads(got.body)["type"] == "image.flagged"

    # A later event for the gone callback is kept, marked, and not sent.
    missed = _scan(tenant, bucket, service_settings, celery_app, callback_url=callback_hook.url)
    row = wait_until(lambda: _delivery(pg_url, missed), message="the missed event recorded")
    assert row.state == "failed" and row.attempts == 0
    assert row.last_error.startswith("endpoint disabled: ") and "410" in row.last_error
    assert len(callback_hook.received) == 1

    # Enabling it through the API: its new events are pending, then delivered.
    enabled = api.post("/v1/webhooks/endpoint/enable", json={"url": callback_hook.url}, headers=_auth(tenant))
    assert enabled.status_code == 200, enabled.text
    assert enabled.json() == {"url": callback_hook.url, "disabled_at": None, "disabled_reason": None}
    assert api.get("/v1/webhooks/deliveries", headers=_auth(tenant)).json()["disabled_callbacks"] == []
    again = _scan(tenant, bucket, service_settings, celery_app, callback_url=callback_hook.url)
    row = wait_until(lambda: _delivery(pg_url, again), message="the next callback event")
    assert row.state in (DELIVERY_PENDING, "delivered") and row.last_error is None
    wait_until(lambda: _delivery(pg_url, again, "delivered"), message="the next callback event delivered")
    assert len(callback_hook.verified()) == 2


def test_a_callback_failing_all_schedule_long_disables_only_itself_and_a_replay_enables_it(
    tenant, main_hook, callback_hook, bucket, service_settings, celery_app, start_service, pg_url, api
) -> None:
    attempts = len(WEBHOOK_ENV["webhook_retry_schedule_s"].split(",")) + 1
    callback_hook.script = {"*": [(500, {})] * attempts}
    start_service("worker", **WEBHOOK_ENV)
    failing = _scan(tenant, bucket, service_settings, celery_app, callback_url=callback_hook.url)
    row = wait_until(lambda: _delivery(pg_url, failing, "failed"), message="the schedule to run out")
    assert row.attempts == attempts and len(callback_hook.received) == attempts

    assert _client_row(pg_url, tenant).webhook_disabled_at is None
    (disabled,) = api.get("/v1/webhooks/deliveries", headers=_auth(tenant)).json()["disabled_callbacks"]
    assert disabled["url"] == callback_hook.url
    assert f"gave up after {attempts} attempts" in disabled["disabled_reason"]

    main = _scan(tenant, bucket, service_settings, celery_app)
    wait_until(lambda: _delivery(pg_url, main, "delivered"), message="the webhook URL's delivery")
    assert _types(main_hook) == ["image.flagged"]

    # The receiver works again (its script has run out: 200 from now on); replaying enables its URL.
    replayed = api.post(f"/v1/webhooks/deliveries/{row.id}/replay", headers=_auth(tenant))
    assert replayed.status_code == 202, replayed.text
    wait_until(lambda: _delivery(pg_url, failing, "delivered"), message="the replay")
    assert api.get("/v1/webhooks/deliveries", headers=_auth(tenant)).json()["disabled_callbacks"] == []
    assert callback_hook.received[-1].headers["webhook-id"] == str(row.id)


def test_a_gone_webhook_url_leaves_callbacks_working_and_is_enabled_through_the_api(
    tenant, main_hook, callback_hook, bucket, service_settings, celery_app, start_service, pg_url, api
) -> None:
    main_hook.script = {"*": [(410, {})]}
    start_service("worker", **WEBHOOK_ENV)
    gone = _scan(tenant, bucket, service_settings, celery_app)
    wait_until(lambda: _delivery(pg_url, gone, "failed"), message="the webhook URL to answer 410")
    listing = api.get("/v1/webhooks/deliveries", headers=_auth(tenant)).json()
    assert "410" in listing["endpoint"]["disabled_reason"] and listing["disabled_callbacks"] == []

    # A scan's own callback URL is another endpoint: still sent to.
    called = _scan(tenant, bucket, service_settings, celery_app, callback_url=callback_hook.url)
    wait_until(lambda: _delivery(pg_url, called, "delivered"), message="the callback's delivery")
    assert _types(callback_hook) == ["image.flagged"]

    unknown = api.post(
        "/v1/webhooks/endpoint/enable", json={"url": "https://never.example/x"}, headers=_auth(tenant)
    )
    assert unknown.status_code == 404 and unknown.headers["content-type"] == PROBLEM
    enabled = api.post("/v1/webhooks/endpoint/enable", headers=_auth(tenant))  # no body: the webhook URL
    assert enabled.status_code == 200, enabled.text
    assert enabled.json()["url"] == main_hook.url and enabled.json()["disabled_at"] is None
    back = _scan(tenant, bucket, service_settings, celery_app)
    wait_until(lambda: _delivery(pg_url, back, "delivered"), message="the webhook URL's next delivery")
    assert len(main_hook.received) == 2


def test_another_clients_endpoints_cannot_be_enabled(pg_url, api) -> None:  # type: ignore[no-untyped-def]
    url = "https://hooks.example/cb"
    with get_sessionmaker(pg_url).begin() as session:
        owner = create_client(session, "owner", all_buckets=True, webhook_url="https://hooks.example/own")
        stranger = create_client(session, "stranger", all_buckets=True)
        session.add(
            WebhookEndpoint(client_id=owner.client.id, url=url, disabled_at=utcnow(), disabled_reason="gone")
        )
    for body in ({"url": url}, None):
        refused = api.post("/v1/webhooks/endpoint/enable", json=body, headers=_auth(stranger))
        assert refused.status_code == 404 and refused.headers["content-type"] == PROBLEM
    (listed,) = api.get("/v1/webhooks/deliveries", headers=_auth(owner)).json()["disabled_callbacks"]
    assert listed["url"] == url
    assert api.get("/v1/webhooks/deliveries", headers=_auth(stranger)).json()["disabled_callbacks"] == []


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_enable_endpoint_turns_one_url_back_on(database: str, pg_url: str, sqlite_url: str) -> None:
    """The function ``synthguard clients enable-webhook`` calls, on both databases."""
    url = pg_url if database == "postgresql" else sqlite_url
    if database == "sqlite":
        upgrade(url)
    sessions = get_sessionmaker(url)
    callback, other = "https://cb.example/a", "https://cb.example/b"
    with sessions.begin() as session:
        client = create_client(session, "cli", all_buckets=True, webhook_url="https://own.example/in").client
        bare = create_client(session, "bare", all_buckets=True).client
        client.webhook_disabled_at, client.webhook_disabled_reason = utcnow(), "gone"
        client_id, bare_id = client.id, bare.id
        for target in (callback, other):
            _give_up(session, client, target, gone=True)
    with sessions.begin() as session:
        assert outbox.enable_endpoint(session, client_id, callback)
        assert not outbox.enable_endpoint(session, client_id, "https://never.example/")
        assert not outbox.enable_endpoint(session, bare_id)  # no webhook URL
        assert not outbox.enable_endpoint(session, uuid.uuid4())
    with sessions() as session:
        assert [s.url for s in outbox.disabled_callbacks(session, client_id)] == [other]
        assert session.get(ApiClient, client_id).webhook_disabled_at is not None  # another endpoint
    with sessions.begin() as session:
        assert outbox.enable_endpoint(session, client_id)  # the client's own
        assert outbox.enable_endpoint(session, client_id)  # already on: still there, nothing changes
    with sessions() as session:
        assert session.get(ApiClient, client_id).webhook_disabled_at is None


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_a_callback_url_that_fails_twice_keeps_one_state_and_its_first_reason(
    database: str, pg_url: str, sqlite_url: str
) -> None:
    url = pg_url if database == "postgresql" else sqlite_url
    if database == "sqlite":
        upgrade(url)
    sessions = get_sessionmaker(url)
    callback = "https://cb.example/dup"
    with sessions.begin() as session:
        client = create_client(session, "dup", all_buckets=True, webhook_url="https://own.example/in").client
        client_id = client.id
        _give_up(session, client, callback, gone=True)
        _give_up(session, client, callback, gone=False)
    with sessions() as session:
        (state,) = outbox.disabled_callbacks(session, client_id)
        assert state.url == callback and "410" in (state.disabled_reason or "")
        assert session.get(ApiClient, client_id).webhook_disabled_at is None


def _give_up(session: Any, client: ApiClient, url: str, *, gone: bool) -> None:
    """Record a delivery to ``url`` failing for good, as the worker does (410, or the schedule's end)."""
    now = utcnow()
    delivery = WebhookDelivery(
        id=uuid.uuid4(),
        client_id=client.id,
        event_type="image.flagged",
        url=url,
        payload={"type": "image.flagged", "timestamp": now.isoformat(), "data": {}},
        state=DELIVERY_PENDING,
        attempts=1,
        attempt_log=[],
        created_at=now - timedelta(hours=1),
        next_attempt_at=now,
    )
    session.add(delivery)
    session.flush()
    claimed = outbox.Claimed(delivery.id, 1, url, b"{}", [])
    result = AttemptResult(
        ok=False, status=410 if gone else 500, latency_ms=1.0, error="HTTP 410" if gone else "HTTP 500", gone=gone,
        permanent=gone,
    )
    # An empty schedule: the first failure is the last, as after a day of retries.
    assert outbox.record(session, claimed, result, lease_s=60, retry_schedule=()) is None
    session.flush()


# -------------------------------------------------------------- secrets at rest


def test_webhook_secrets_are_sealed_at_rest_and_still_sign(
    tenant, main_hook, bucket, service_settings, celery_app, start_service, pg_url, api
) -> None:
    def stored() -> tuple[str | None, str | None]:
        with get_sessionmaker(pg_url)() as session:
            row = session.execute(
                select(ApiClient.webhook_secret, ApiClient.webhook_secret_previous).where(
                    ApiClient.id == tenant.client.id
                )
            ).one()
        return row.webhook_secret, row.webhook_secret_previous

    current, _ = stored()
    assert current is not None and current != tenant.webhook_secret and not current.startswith("whsec_")
    assert tenant.webhook_secret.removeprefix("whsec_") not in current

    rotated = api.post("/v1/webhooks/secret/rotate", headers=_auth(tenant))
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["webhook_secret"]
    current, previous = stored()
    for raw in (current, previous):
        assert raw is not None and not raw.startswith("whsec_")
        assert raw not in (tenant.webhook_secret, new_secret)

    main_hook.secrets = [tenant.webhook_secret, new_secret]
    start_service("worker", **WEBHOOK_ENV)  # with the service's SYNTHGUARD_SECRET_KEY
    done = _scan(tenant, bucket, service_settings, celery_app)
    wait_until(lambda: _delivery(pg_url, done, "delivered"), message="the delivery")
    (got,) = main_hook.received
    assert got.verified_with == [tenant.webhook_secret, new_secret]  # both real secrets, opened to sign


# --------------------------------------------------------------------- rotation


def test_rotating_twice_within_the_overlap_is_409_unless_revoking_the_previous(
    tenant, main_hook, bucket, service_settings, celery_app, start_service, pg_url, api
) -> None:
    first = api.post("/v1/webhooks/secret/rotate", headers=_auth(tenant))
    assert first.status_code == 200 and first.json()["previous_valid_until"] is not None

    conflict = api.post("/v1/webhooks/secret/rotate", headers=_auth(tenant))
    assert conflict.status_code == 409 and conflict.headers["content-type"] == PROBLEM
    problem = conflict.json()
    assert problem["type"] == "urn:synthguard:problem:secret-rotation-conflict"
    assert "revoke" in problem["detail"] and problem["previous_valid_until"]

    second = api.post("/v1/webhooks/secret/rotate", json={"revoke_previous": True}, headers=_auth(tenant))
    assert second.status_code == 200, second.text
    assert second.json()["previous_valid_until"] is None
    newest = second.json()["webhook_secret"]

    main_hook.secrets = [tenant.webhook_secret, first.json()["webhook_secret"], newest]
    start_service("worker", **WEBHOOK_ENV)
    done = _scan(tenant, bucket, service_settings, celery_app)
    wait_until(lambda: _delivery(pg_url, done, "delivered"), message="the delivery")
    (got,) = main_hook.received
    assert got.verified_with == [newest]  # only the newest secret signs
    assert len(got.headers["webhook-signature"].split()) == 1


def test_revoke_previous_stops_the_old_secret_at_once(
    tenant, main_hook, bucket, service_settings, celery_app, start_service, pg_url, api
) -> None:
    rotated = api.post("/v1/webhooks/secret/rotate", headers=_auth(tenant)).json()
    assert rotated["previous_valid_until"] is not None
    revoked = api.post("/v1/webhooks/secret/revoke-previous", headers=_auth(tenant))
    assert revoked.status_code == 200 and revoked.json() == {"revoked": True}
    assert api.post("/v1/webhooks/secret/revoke-previous", headers=_auth(tenant)).json() == {"revoked": False}

    main_hook.secrets = [tenant.webhook_secret, rotated["webhook_secret"]]
    start_service("worker", **WEBHOOK_ENV)
    done = _scan(tenant, bucket, service_settings, celery_app)
    wait_until(lambda: _delivery(pg_url, done, "delivered"), message="the delivery")
    (got,) = main_hook.received
    assert got.verified_with == [rotated["webhook_secret"]]
    assert len(got.headers["webhook-signature"].split()) == 1
    # Nothing left in its overlap: rotating again needs no revoke_previous.
    assert api.post("/v1/webhooks/secret/rotate", headers=_auth(tenant)).status_code == 200
