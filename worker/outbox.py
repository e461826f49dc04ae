"""The webhook outbox: deliveries are rows written in the transaction that decides them.

* ``add_*`` run inside the scorer's transaction, so a stored flag and its
  ``image.flagged`` delivery commit together or not at all.
* A delivery is sent by :func:`send_delivery` (the ``deliver_webhook`` task):
  claim it (one attempt number, one sender), send outside any transaction,
  record the attempt, schedule the next one from the documented schedule.
* :func:`dispatch_due` (the sweeper) publishes deliveries that are due and
  have no message in flight: new ones whose message was lost, and retries.

The webhook id is the delivery's id, the same on every attempt, so a receiver
deduplicates redeliveries; the body is the stored payload, byte for byte.

Endpoints are disabled one URL at a time: a URL that answers 410 Gone, or fails
for the whole retry schedule, stops getting new deliveries, and no other URL
does. The client's own ``webhook_url`` keeps that state on ``api_clients``; a
scan's ``callback_url`` keeps it in ``webhook_endpoints``, so a tenant's broken
per-scan callback never silences its main endpoint. A replay, or
:func:`enable_endpoint`, turns a URL back on.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from .clients import signing_secrets
from .models import (
    DELIVERY_DELIVERED,
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    FAILED,
    ApiClient,
    Image,
    Scan,
    WebhookDelivery,
    WebhookEndpoint,
    utcnow,
)
from .netguard import URLPolicy
from .secretbox import SecretBox
from .webhooks import EVENT_IMAGE_FLAGGED, EVENT_SCAN_COMPLETED, build_body, deliver, next_delay

log = logging.getLogger(__name__)

DEFAULT_EVENTS = (EVENT_IMAGE_FLAGGED,)
# Past this, an endpoint whose deliveries all fail is disabled (the schedule spans about a day).
ENDPOINT_GIVE_UP = "gave up after {attempts} attempts over {hours:.0f} h; last error: {error}"


def body_bytes(payload: dict[str, Any]) -> bytes:
    """The exact bytes sent, rebuilt from the stored payload: the same on every attempt."""
    return build_body(payload["type"], payload["data"], timestamp=datetime.fromisoformat(payload["timestamp"]))


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _url_for(
    event_type: str, scan_events: Sequence[str] | None, callback_url: str | None, client_url: str | None
) -> str | None:
    """Where a scan's ``event_type`` event goes: its callback URL, else its client's webhook URL.

    None when the scan did not ask for this event, or no URL is set. The one rule for both
    :func:`_add` (ORM objects) and :func:`scans_wanting` (plain rows).
    """
    if event_type not in (scan_events or DEFAULT_EVENTS):
        return None
    return callback_url or client_url or None


def _target(session: Session, scan: Scan, event_type: str) -> tuple[str, ApiClient] | None:
    """The URL and client this scan's ``event_type`` event goes to, if any."""
    if scan.client_id is None:
        return None
    client = session.get(ApiClient, scan.client_id)
    if client is None:
        return None
    url = _url_for(event_type, scan.webhook_events, scan.callback_url, client.webhook_url)
    return (url, client) if url else None


def scans_wanting(session: Session, scan_ids: Sequence[uuid.UUID], event_type: str) -> set[uuid.UUID]:
    """Those of ``scan_ids`` whose ``event_type`` events have somewhere to go (``add_*`` writes a row).

    :func:`_target`'s answer for many scans in one Core query, without loading ORM objects:
    the scorer asks it for every batch, and most scans have no webhook.
    """
    scans, clients = Scan.__table__, ApiClient.__table__
    rows = session.execute(
        select(scans.c.id, scans.c.webhook_events, scans.c.callback_url, clients.c.webhook_url)
        .join(clients, clients.c.id == scans.c.client_id)
        .where(scans.c.id.in_(scan_ids))
    )
    return {row.id for row in rows if _url_for(event_type, row.webhook_events, row.callback_url, row.webhook_url)}


def _add(
    session: Session, scan: Scan, event_type: str, data: dict[str, Any], image_id: uuid.UUID | None, now: datetime, lease_s: float
) -> uuid.UUID | None:
    target = _target(session, scan, event_type)
    if target is None:
        return None
    url, client = target
    delivery = WebhookDelivery(
        id=uuid.uuid4(),
        client_id=client.id,
        scan_id=scan.id,
        image_id=image_id,
        event_type=event_type,
        url=url,
        payload={"type": event_type, "timestamp": now.isoformat(), "data": data},
        attempts=0,
        attempt_log=[],
        created_at=now,
        next_attempt_at=now,
    )
    disabled = _disabled_reason(session, client, url)
    if disabled is not None:
        # Kept, not silently dropped: the client can see what it missed and why.
        delivery.state = DELIVERY_FAILED
        delivery.last_error = f"endpoint disabled: {disabled}"
    else:
        delivery.state = DELIVERY_PENDING
        # Its message is about to be published; until then the sweeper leaves it alone.
        delivery.sending_until = now + timedelta(seconds=lease_s)
    session.add(delivery)
    session.flush()
    return delivery.id if delivery.state == DELIVERY_PENDING else None


def add_image_flagged(session: Session, image_id: uuid.UUID, *, lease_s: float) -> uuid.UUID | None:
    """Queue ``image.flagged`` for a just-flagged image (inside the scorer's transaction)."""
    image = session.get(Image, image_id)
    if image is None:
        return None
    scan = session.get(Scan, image.scan_id)
    now = utcnow()
    data = {
        "image_id": str(image.id),
        "scan_id": str(image.scan_id),
        "bucket": image.bucket,
        "key": image.key,
        "version_id": image.version_id,
        "etag": image.etag,
        "score": image.score,
        "threshold": image.threshold,
        # Why it was flagged: the score, strong provenance evidence, a match in the client's bank.
        "flagged_by": image.flagged_by
        if image.flagged_by is not None
        else [  # an image stored before flagged_by was recorded
            reason
            for reason, hit in (
                ("score", image.score is not None and image.score >= image.threshold),
                ("provenance", bool((image.provenance or {}).get("ai"))),
            )
            if hit
        ],
        "model": {"name": image.model_name, "version": image.model_version},
        "provenance": image.provenance,
        "known_match": image.known_match,
        "generator": image.generator,
        "quality": image.quality,
        "frames": image.frames,
        "cached_from": None if image.cached_from is None else str(image.cached_from),
        "metadata": scan.meta,
        "links": {"image": f"/v1/images/{image.id}", "scan": f"/v1/scans/{image.scan_id}"},
    }
    return _add(session, scan, EVENT_IMAGE_FLAGGED, data, image.id, now, lease_s)


def add_scan_completed(session: Session, scan_id: uuid.UUID, *, lease_s: float) -> uuid.UUID | None:
    """Queue ``scan.completed`` when the scan asked for it (inside the completing transaction)."""
    scan = session.get(Scan, scan_id)
    if scan is None:
        return None
    counts = dict(
        session.execute(select(Image.state, func.count()).where(Image.scan_id == scan_id).group_by(Image.state)).all()
    )
    flagged = session.scalar(select(func.count()).where(Image.scan_id == scan_id, Image.flagged.is_(True)))
    now = utcnow()
    data = {
        "scan_id": str(scan.id),
        "image_count": scan.image_count,
        "counts": {"done": counts.get("done", 0), "failed": counts.get(FAILED, 0), "flagged": flagged or 0},
        "metadata": scan.meta,
        "completed_at": _iso(scan.completed_at) or now.isoformat(),
        "links": {"scan": f"/v1/scans/{scan.id}"},
    }
    return _add(session, scan, EVENT_SCAN_COMPLETED, data, None, now, lease_s)


@dataclass(frozen=True)
class Claimed:
    """One attempt, owned by the caller: what to send and with which secrets."""

    delivery_id: uuid.UUID
    attempt: int
    url: str
    body: bytes
    secrets: list[str]


def claim(
    session: Session, delivery_id: uuid.UUID, attempt: int, *, hold_s: float, box: SecretBox
) -> Claimed | None:
    """Take attempt number ``attempt`` of a due, pending delivery; None if someone else has it.

    The attempt number in the message is what makes a duplicate message harmless:
    only one claim per number can succeed. The client's secrets are opened with
    ``box`` (they are stored sealed); a secret that does not open raises
    :class:`~worker.errors.ConfigError` and, the transaction rolled back, the
    claim never happened.
    """
    now = utcnow()
    row = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.state == DELIVERY_PENDING,
            WebhookDelivery.attempts == attempt - 1,
            WebhookDelivery.next_attempt_at <= now,
        )
        .values(attempts=attempt, sending_until=now + timedelta(seconds=hold_s))
        .returning(WebhookDelivery.url, WebhookDelivery.payload, WebhookDelivery.client_id)
    ).one_or_none()
    if row is None:
        return None
    client = session.get(ApiClient, row.client_id)
    secrets = signing_secrets(client, box, now) if client else []
    return Claimed(delivery_id, attempt, row.url, body_bytes(row.payload), secrets)


def record(
    session: Session, claimed: Claimed, result: Any, *, lease_s: float, retry_schedule: Sequence[float]
) -> float | None:
    """Store one attempt's outcome; returns the delay before the next attempt, or None when final."""
    now = utcnow()
    delivery = session.get(WebhookDelivery, claimed.delivery_id)
    entry = {
        "attempt": claimed.attempt,
        "at": now.isoformat(),
        "status": result.status,
        "latency_ms": round(result.latency_ms, 1),
        "error": result.error,
    }
    delivery.attempt_log = [*(delivery.attempt_log or []), entry]
    delivery.last_status = result.status
    delivery.last_error = result.error
    delivery.sending_until = None
    if result.ok:
        delivery.state = DELIVERY_DELIVERED
        delivery.delivered_at = now
        return None
    client = session.get(ApiClient, delivery.client_id) if delivery.client_id else None
    delay = None if result.permanent else next_delay(
        claimed.attempt, retry_after_s=result.retry_after_s, schedule=retry_schedule
    )
    if delay is None:
        delivery.state = DELIVERY_FAILED
        # An unsafe URL is refused, not failing: it disables nothing (the next scan may name a good one).
        if client is not None and (result.gone or not result.permanent):
            hours = (now - delivery.created_at).total_seconds() / 3600
            reason = (
                f"{delivery.url} answered 410 Gone"
                if result.gone
                else ENDPOINT_GIVE_UP.format(attempts=claimed.attempt, hours=hours, error=result.error)
            )
            _disable(session, client, delivery.url, reason, now)
        return None
    delivery.next_attempt_at = now + timedelta(seconds=delay)
    # A short wait is published with a countdown now; a long one is left to the sweeper.
    delivery.sending_until = delivery.next_attempt_at + timedelta(seconds=lease_s) if delay <= lease_s else None
    return delay


def send_delivery(
    sessions: sessionmaker[Session],
    delivery_id: uuid.UUID,
    attempt: int,
    *,
    policy: URLPolicy,
    box: SecretBox,
    timeout_s: float,
    lease_s: float,
    retry_schedule: Sequence[float],
    publish_retry: Callable[[uuid.UUID, int, float], None] | None = None,
) -> str:
    """One attempt of one delivery, end to end; returns what became of it.

    ``box`` opens the client's stored webhook secrets (``SecretBox.from_settings``).
    """
    # Imported here: the API imports this module and should not show empty worker series.
    from .metrics import webhook_attempt

    with sessions.begin() as session:
        claimed = claim(session, delivery_id, attempt, hold_s=timeout_s + 30, box=box)
    if claimed is None:
        return webhook_attempt("skipped")
    result = deliver(claimed.url, msg_id=str(delivery_id), body=claimed.body, secrets=claimed.secrets, policy=policy, timeout_s=timeout_s)
    with sessions.begin() as session:
        delay = record(session, claimed, result, lease_s=lease_s, retry_schedule=retry_schedule)
    if result.ok:
        return webhook_attempt(DELIVERY_DELIVERED)
    if delay is None:
        log.warning("webhook %s failed for good: %s", delivery_id, result.error)
        return webhook_attempt(DELIVERY_FAILED)
    if publish_retry is not None and delay <= lease_s:
        publish_retry(delivery_id, attempt + 1, delay)
    return webhook_attempt("retrying")


def due(session: Session, *, lease_s: float, limit: int = 1000) -> list[tuple[uuid.UUID, int]]:
    """Deliveries due now with no message in flight; marks them in flight. Returns (id, next attempt)."""
    now = utcnow()
    rows = session.execute(
        select(WebhookDelivery.id, WebhookDelivery.attempts)
        .where(
            WebhookDelivery.state == DELIVERY_PENDING,
            WebhookDelivery.next_attempt_at <= now,
            or_(WebhookDelivery.sending_until.is_(None), WebhookDelivery.sending_until < now),
        )
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if rows:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_([r.id for r in rows]))
            .values(sending_until=now + timedelta(seconds=lease_s))
        )
    return [(r.id, r.attempts + 1) for r in rows]


def replay(
    session: Session, delivery_id: uuid.UUID, client_id: uuid.UUID, *, lease_s: float
) -> tuple[uuid.UUID, int] | None:
    """Make a client's delivery due again, same webhook id; None if it is not theirs.

    A replay is the client saying the delivery's endpoint works again, so that
    URL is enabled if it was disabled (its own URL, whether the client's
    webhook URL or a scan's callback URL; no other). The caller publishes the
    returned (id, attempt).
    """
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.client_id != client_id:
        return None
    now = utcnow()
    client = session.get(ApiClient, client_id)
    if client is not None:
        _enable(session, client, delivery.url)
    delivery.state = DELIVERY_PENDING
    delivery.next_attempt_at = now
    delivery.sending_until = now + timedelta(seconds=lease_s)
    return delivery.id, delivery.attempts + 1


# ------------------------------------------------------------------ endpoint state


@dataclass(frozen=True)
class EndpointState:
    """One URL a client's deliveries go to, and whether synthguard still sends to it."""

    url: str
    disabled_at: datetime | None
    disabled_reason: str | None


def _is_own(client: ApiClient, url: str) -> bool:
    # The client's webhook URL keeps its state on api_clients; any other URL in webhook_endpoints.
    return client.webhook_url is not None and url == client.webhook_url


def _endpoint_row(session: Session, client_id: uuid.UUID, url: str) -> WebhookEndpoint | None:
    return session.scalar(
        select(WebhookEndpoint).where(WebhookEndpoint.client_id == client_id, WebhookEndpoint.url == url)
    )


def _disabled_reason(session: Session, client: ApiClient, url: str) -> str | None:
    """Why ``url`` gets none of ``client``'s new deliveries; None while it is enabled."""
    if _is_own(client, url):
        if client.webhook_disabled_at is None:
            return None
        return client.webhook_disabled_reason or "disabled"
    row = session.execute(
        select(WebhookEndpoint.disabled_at, WebhookEndpoint.disabled_reason).where(
            WebhookEndpoint.client_id == client.id, WebhookEndpoint.url == url
        )
    ).one_or_none()
    if row is None or row.disabled_at is None:
        return None
    return row.disabled_reason or "disabled"


def _disable(session: Session, client: ApiClient, url: str, reason: str, now: datetime) -> None:
    """Stop new deliveries to ``url`` (only it); the first reason is kept while it stays disabled."""
    if _is_own(client, url):
        if client.webhook_disabled_at is None:
            client.webhook_disabled_at = now
            client.webhook_disabled_reason = reason
        return
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
    if insert is None:  # pragma: no cover - PostgreSQL and SQLite are the supported databases
        raise RuntimeError(f"webhook endpoint state is not implemented for {dialect}")
    table = WebhookEndpoint.__table__
    statement = insert(table).values(
        id=uuid.uuid4(), client_id=client.id, url=url, disabled_at=now, disabled_reason=reason, created_at=now
    )
    # One statement, not select-then-insert: two deliveries to one URL may give up at the same moment.
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[table.c.client_id, table.c.url],
            set_={
                "disabled_at": statement.excluded.disabled_at,
                "disabled_reason": statement.excluded.disabled_reason,
            },
            where=table.c.disabled_at.is_(None),
        )
    )


def _enable(session: Session, client: ApiClient, url: str) -> EndpointState | None:
    """Send to ``url`` again; its state now, or None when ``url`` has no state for this client."""
    if _is_own(client, url):
        client.webhook_disabled_at = None
        client.webhook_disabled_reason = None
        return EndpointState(url, None, None)
    row = _endpoint_row(session, client.id, url)
    if row is None:
        return None
    row.disabled_at = None
    row.disabled_reason = None
    session.flush()
    return EndpointState(url, None, None)


def enable_endpoint(session: Session, client_id: uuid.UUID, url: str | None = None) -> bool:
    """Turn an endpoint of a client back on: ``url``, or the client's own webhook URL when None.

    Returns False when there is no such endpoint: no such client, no webhook
    URL, or a URL that is not the client's webhook URL and never failed (only
    failed callback URLs have state). Enabling an enabled endpoint is True and
    changes nothing. Deliveries missed while it was disabled stay ``failed``;
    replay the ones wanted.
    """
    return enable_endpoint_state(session, client_id, url) is not None


def enable_endpoint_state(session: Session, client_id: uuid.UUID, url: str | None = None) -> EndpointState | None:
    """:func:`enable_endpoint`, answering the endpoint's new state (None: no such endpoint)."""
    client = session.get(ApiClient, client_id)
    if client is None:
        return None
    target = url if url is not None else client.webhook_url
    if not target:
        return None
    state = _enable(session, client, target)
    session.flush()
    return state


def disabled_callbacks(session: Session, client_id: uuid.UUID) -> list[EndpointState]:
    """The client's callback URLs (not its webhook URL) that get no deliveries now, newest first."""
    rows = session.scalars(
        select(WebhookEndpoint)
        .where(WebhookEndpoint.client_id == client_id, WebhookEndpoint.disabled_at.is_not(None))
        .order_by(WebhookEndpoint.disabled_at.desc(), WebhookEndpoint.url)
    )
    return [EndpointState(row.url, row.disabled_at, row.disabled_reason) for row in rows]
