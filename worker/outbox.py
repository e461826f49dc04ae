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
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from .models import (
    DELIVERY_DELIVERED,
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    FAILED,
    ApiClient,
    Image,
    Scan,
    WebhookDelivery,
    utcnow,
)
from .webhooks import EVENT_IMAGE_FLAGGED, EVENT_SCAN_COMPLETED, URLPolicy, build_body, deliver, next_delay

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
    if client.webhook_disabled_at is not None:
        # Kept, not silently dropped: the client can see what it missed and why.
        delivery.state = DELIVERY_FAILED
        delivery.last_error = f"endpoint disabled: {client.webhook_disabled_reason}"
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
        # Why it was flagged: the score, strong provenance evidence, or both.
        "flagged_by": [
            reason
            for reason, hit in (
                ("score", image.score is not None and image.score >= image.threshold),
                ("provenance", bool((image.provenance or {}).get("ai"))),
            )
            if hit
        ],
        "model": {"name": image.model_name, "version": image.model_version},
        "provenance": image.provenance,
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


def _secrets(client: ApiClient, now: datetime) -> list[str]:
    secrets = [client.webhook_secret] if client.webhook_secret else []
    until = client.webhook_secret_previous_until
    if client.webhook_secret_previous and until is not None and _aware(until) > now:
        # Rotation overlap: receivers still on the old secret keep verifying.
        secrets.append(client.webhook_secret_previous)
    return secrets


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; they were written in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=utcnow().tzinfo)


def claim(session: Session, delivery_id: uuid.UUID, attempt: int, *, hold_s: float) -> Claimed | None:
    """Take attempt number ``attempt`` of a due, pending delivery; None if someone else has it.

    The attempt number in the message is what makes a duplicate message harmless:
    only one claim per number can succeed.
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
    return Claimed(delivery_id, attempt, row.url, body_bytes(row.payload), _secrets(client, now) if client else [])


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
        if client is not None and client.webhook_disabled_at is None and (result.gone or not result.permanent):
            hours = (now - _aware(delivery.created_at)).total_seconds() / 3600
            client.webhook_disabled_at = now
            client.webhook_disabled_reason = (
                f"{delivery.url} answered 410 Gone"
                if result.gone
                else ENDPOINT_GIVE_UP.format(attempts=claimed.attempt, hours=hours, error=result.error)
            )
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
    timeout_s: float,
    lease_s: float,
    retry_schedule: Sequence[float],
    publish_retry: Callable[[uuid.UUID, int, float], None] | None = None,
) -> str:
    """One attempt of one delivery, end to end; returns what became of it."""
    # Imported here: the API imports this module and should not show empty worker series.
    from .metrics import webhook_attempt

    with sessions.begin() as session:
        claimed = claim(session, delivery_id, attempt, hold_s=timeout_s + 30)
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

    A replay is the client saying its endpoint works again, so a disabled
    endpoint is enabled. The caller publishes the returned (id, attempt).
    """
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.client_id != client_id:
        return None
    now = utcnow()
    client = session.get(ApiClient, client_id)
    if client is not None and delivery.url == client.webhook_url:
        client.webhook_disabled_at = None
        client.webhook_disabled_reason = None
    delivery.state = DELIVERY_PENDING
    delivery.next_attempt_at = now
    delivery.sending_until = now + timedelta(seconds=lease_s)
    return delivery.id, delivery.attempts + 1
