"""Putting work on the broker: enqueue (rows, then messages), publish, and the sweeper.

Messages carry image ids only. They are published after the transaction that
wrote the rows has committed, so a worker never receives an id the database
does not know; a message lost on the way (broker down, Redis flushed) is
re-published by :func:`sweep_stale` because the row is still ``queued``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .celery_app import (
    BANK_CROPS_TASK,
    BULK_QUEUE,
    DELIVER_TASK,
    LANES,
    OVERFLOW_QUEUE,
    SCORE_CHUNK_TASK,
    SCORE_TASK,
    WEBHOOKS_QUEUE,
)
from .db import get_sessionmaker
from .errors import IdempotencyConflict
from .intake import create_scan, effective_threshold, unique_refs
from .models import PROCESSING, QUEUED, Image, ImageReview, Scan, utcnow
from .reviews import CROPS_PENDING
from .settings import Settings, get_settings
from .storage import ObjectRef, check_ref, parse_s3_uri
from .tenancy import check_intake, event_lane, lock_client, pending_images

log = logging.getLogger(__name__)

# Scans run in-process by the CLI: their images are not queue work.
IN_PROCESS_ORIGINS = ("cli", "demo")


@dataclass(frozen=True)
class Enqueued:
    """What a producer gets back: the scan and one image id per object, in order."""

    scan_id: uuid.UUID
    image_ids: list[uuid.UUID]
    priority: str
    created: bool = True  # False: an earlier request with the same idempotency key
    refs: list[ObjectRef] = field(default_factory=list)


def realtime_share(pending: int, count: int, burst: int) -> int:
    """How many of ``count`` new realtime images go to the realtime queue; the rest overflow.

    A client with ``pending`` realtime images not yet done keeps the realtime
    queue for up to ``burst`` of them, so a flood from one client waits in
    ``synthguard.overflow`` behind the other clients' images instead of in
    front of them. ``burst`` 0 turns overflow off.
    """
    if burst <= 0:
        return count
    return max(0, min(count, burst - pending))


def publish(
    app: Celery,
    image_ids: Sequence[uuid.UUID],
    lane: str,
    *,
    ahead: int | None = None,
    chunk: int = 1,
    countdown: float | None = None,
) -> int:
    """Send the ids to the lane's queue; returns how many ids were sent.

    Realtime: one ``score_image`` message per id; with ``ahead``, only the
    first ``ahead`` ids go to the lane's queue and the rest to
    ``synthguard.overflow`` (see :func:`realtime_share`). Bulk: one
    ``score_chunk`` message per ``chunk`` ids (SYNTHGUARD_BULK_CHUNK).
    ``countdown``: not before this many seconds (a retry's backoff).
    """
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    ahead = len(image_ids) if ahead is None else ahead
    sent = 0
    with app.producer_or_acquire() as producer:
        if lane == "bulk":
            for start in range(0, len(image_ids), chunk):
                part = [str(image_id) for image_id in image_ids[start : start + chunk]]
                app.send_task(
                    SCORE_CHUNK_TASK, args=[part], queue=BULK_QUEUE, countdown=countdown, producer=producer
                )
                sent += len(part)
            return sent
        for image_id in image_ids:
            queue = LANES[lane] if sent < ahead else OVERFLOW_QUEUE
            app.send_task(SCORE_TASK, args=[str(image_id)], queue=queue, countdown=countdown, producer=producer)
            sent += 1
    return sent


def waiting_messages(app: Celery, queue: str) -> int:
    """Messages ready on ``queue`` now (0 when the broker has none, or no such queue)."""
    with app.pool.acquire(block=True) as connection:
        try:
            return int(connection.default_channel.queue_declare(queue=queue, passive=True).message_count)
        except connection.channel_errors:
            # The Redis transport says a queue with no messages does not exist.
            return 0


def publish_deliveries(app: Celery, deliveries: Iterable[tuple[uuid.UUID, int]], countdown: float | None = None) -> int:
    """Send one ``deliver_webhook`` message per (delivery id, attempt number)."""
    sent = 0
    with app.producer_or_acquire() as producer:
        for delivery_id, attempt in deliveries:
            app.send_task(
                DELIVER_TASK,
                args=[str(delivery_id), attempt],
                queue=WEBHOOKS_QUEUE,
                countdown=countdown,
                producer=producer,
            )
            sent += 1
    return sent


def publish_crops(app: Celery, review_ids: Sequence[uuid.UUID], *, countdown: float | None = None) -> bool:
    """Ask a worker to bank the crops of each review's image; False when the broker refused (the sweeper
    publishes them later: they stay ``pending``)."""
    try:
        with app.producer_or_acquire() as producer:
            for review_id in review_ids:
                app.send_task(BANK_CROPS_TASK, args=[str(review_id)], countdown=countdown, producer=producer)
    except Exception as exc:  # noqa: BLE001 - as publish_quietly
        log.warning("could not ask for the crops of %d reviews (%s); the sweeper will", len(review_ids), exc)
        return False
    return True


def publish_quietly(
    app: Celery,
    image_ids: Sequence[uuid.UUID],
    lane: str,
    *,
    ahead: int | None = None,
    chunk: int = 1,
    countdown: float | None = None,
) -> bool:
    """Publish, but a broker outage is not the producer's failure: the sweeper will publish later."""
    try:
        publish(app, image_ids, lane, ahead=ahead, chunk=chunk, countdown=countdown)
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds; the rows are safe either way
        log.warning("could not publish %d images to %s (%s); the sweeper will", len(image_ids), lane, exc)
        return False
    return True


def as_ref(obj: ObjectRef | str | tuple[str, str] | tuple[str, str, str | None]) -> ObjectRef:
    """An S3 object from a ref, an ``s3://bucket/key`` URI or a (bucket, key[, version]) tuple."""
    if isinstance(obj, ObjectRef):
        ref = obj
    elif isinstance(obj, str):
        bucket, key = parse_s3_uri(obj)
        ref = ObjectRef(bucket, key)
    else:
        ref = ObjectRef(obj[0], obj[1], obj[2] if len(obj) > 2 else None)  # type: ignore[misc]
    if ref.is_local or not ref.key or ref.key.endswith("/"):
        raise ValueError(f"{ref.uri!r} is not an S3 object (s3://bucket/key)")
    try:
        return check_ref(ref)
    except ValueError as exc:
        raise ValueError(f"{ref.uri!r}: {exc}") from None


def request_hash(payload: Any) -> str:
    """A stable digest of a request body, to tell a retry from a different request."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _existing(session: Session, client_id: uuid.UUID | None, key: str, digest: str) -> Enqueued | None:
    scan = session.scalar(select(Scan).where(Scan.client_id == client_id, Scan.idempotency_key == key))
    if scan is None:
        return None
    if scan.request_hash != digest:
        raise IdempotencyConflict(f"idempotency key {key!r} was already used for a different request")
    rows = session.execute(
        select(Image.id, Image.bucket, Image.key, Image.version_id)
        .where(Image.scan_id == scan.id)
        .order_by(Image.created_at, Image.id)
    ).all()
    return Enqueued(
        scan.id,
        [r.id for r in rows],
        scan.priority,
        created=False,
        refs=[ObjectRef(r.bucket, r.key, r.version_id) for r in rows],
    )


def enqueue(
    objects: Iterable[ObjectRef | str | tuple[str, str] | tuple[str, str, str | None]],
    *,
    priority: str = "realtime",
    threshold: float | None = None,
    client_id: uuid.UUID | None = None,
    callback_url: str | None = None,
    metadata: dict[str, Any] | None = None,
    webhook_events: Sequence[str] | None = None,
    idempotency_key: str | None = None,
    origin: str = "python",
    enforce_caps: bool = True,
    settings: Settings | None = None,
    sessions: sessionmaker[Session] | None = None,
    app: Celery | None = None,
) -> Enqueued:
    """Queue S3 objects for scoring: one scan, one ``queued`` image each, then their messages
    (one per image on realtime, one per ``settings.bulk_chunk`` images on bulk).

    With ``client_id``, every object must be inside the client's grants and
    ``priority`` one of its lanes (else :class:`~worker.errors.NotGranted` or
    :class:`~worker.errors.LaneNotAllowed`, and nothing is written); with
    ``enforce_caps`` (operators' commands turn it off) its pending cap for the
    lane must have room (else :class:`~worker.errors.QuotaExceeded`).

    Realtime images past the client's burst (``SYNTHGUARD_REALTIME_BURST``
    pending) go to ``synthguard.overflow``; see :func:`realtime_share`.

    With ``idempotency_key``, the same key and request return the first scan
    instead of a second one; the same key with a different request raises
    :class:`IdempotencyConflict`.
    """
    if priority not in LANES:
        raise ValueError(f"priority must be one of {sorted(LANES)}, not {priority!r}")
    settings = settings or get_settings()
    sessions = sessions or get_sessionmaker(settings.database_url)
    refs = unique_refs(as_ref(obj) for obj in objects)
    digest = request_hash(
        {
            "objects": [[r.bucket, r.key, r.version_id] for r in refs],
            "priority": priority,
            "threshold": threshold,
            "callback_url": callback_url,
            "metadata": metadata,
            "webhook_events": sorted(webhook_events) if webhook_events is not None else None,
        }
    )
    pending = 0
    try:
        with sessions.begin() as session:
            if idempotency_key is not None:
                found = _existing(session, client_id, idempotency_key, digest)
                if found is not None:
                    return found
            if client_id is not None:
                pending = check_intake(session, client_id, refs, priority, settings, enforce_caps=enforce_caps)
            elif priority == "realtime" and settings.realtime_burst > 0:
                pending = pending_images(session, None, priority)
            scan, ids = create_scan(
                session,
                refs,
                origin=origin,
                source=None,
                threshold=effective_threshold(session, settings, client_id, threshold),
                scan_threshold=threshold,
                client_id=client_id,
                priority=priority,
                callback_url=callback_url,
                meta=metadata,
                webhook_events=sorted(set(webhook_events)) if webhook_events is not None else None,
                idempotency_key=idempotency_key,
                request_hash=digest,
            )
            scan_id = scan.id
    except IntegrityError:
        if idempotency_key is None:
            raise
        # A concurrent request with the same key committed first: answer with its scan.
        with sessions() as session:
            found = _existing(session, client_id, idempotency_key, digest)
        if found is None:
            raise
        return found
    ahead = realtime_share(pending, len(ids), settings.realtime_burst) if priority == "realtime" else None
    publish_quietly(app or _default_app(), ids, priority, ahead=ahead, chunk=settings.bulk_chunk)
    return Enqueued(scan_id, ids, priority, refs=refs)


@dataclass(frozen=True)
class ObjectEvent:
    """One "object created" notification from a store: the object and what identifies the event."""

    bucket: str
    key: str
    version_id: str | None = None
    etag: str | None = None
    sequencer: str | None = None

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef(self.bucket, self.key, self.version_id)

    @property
    def dedupe_key(self) -> str:
        """Equal for a redelivery of the same event, different for a new write of the same key.

        The sequencer orders writes to one key; stores that send none still
        tell writes apart by version id or ETag.
        """
        ident = [self.bucket, self.key, self.version_id, self.etag, self.sequencer]
        return hashlib.sha256(json.dumps(ident, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class EventIntake:
    """What object-event intake did: one image id per event, in order, and which were known already."""

    scan_id: uuid.UUID | None  # None: every event was a duplicate, so no scan was made
    image_ids: list[uuid.UUID]
    duplicates: list[bool]
    priority: str

    @property
    def new_count(self) -> int:
        return self.duplicates.count(False)


def enqueue_object_events(
    events: Sequence[ObjectEvent],
    *,
    client_id: uuid.UUID,
    priority: str | None = None,
    threshold: float | None = None,
    origin: str = "s3-event",
    settings: Settings | None = None,
    sessions: sessionmaker[Session] | None = None,
    app: Celery | None = None,
) -> EventIntake:
    """Queue the objects of store notifications, each event at most once per client.

    ``priority`` None: the client's event lane (realtime when it may use it).
    Every object must be inside the client's grants, the lane one of its
    lanes and its pending cap must have room, as for :func:`enqueue`; one
    refused object refuses the whole notification, before anything is written.

    A redelivered event (same dedupe key) adds no image and no message: its
    answer is the image queued the first time. New images form one scan;
    when there are none, no scan is created. Messages go out after commit.
    """
    if priority is not None and priority not in LANES:
        raise ValueError(f"priority must be one of {sorted(LANES)}, not {priority!r}")
    settings = settings or get_settings()
    sessions = sessions or get_sessionmaker(settings.database_url)
    for event in events:
        as_ref(event.ref)  # the same check enqueue() makes: a real S3 object, not a "folder"
    with sessions.begin() as session:
        lane = priority
        if lane is None:
            client = lock_client(session, client_id)
            lane = event_lane(client) if client is not None else "realtime"
        if not events:
            return EventIntake(None, [], [], lane)
        pending = check_intake(session, client_id, [e.ref for e in events], lane, settings, enforce_caps=True)
        scan, ids = create_scan(
            session,
            [event.ref for event in events],
            origin=origin,
            threshold=effective_threshold(session, settings, client_id, threshold),
            scan_threshold=threshold,
            client_id=client_id,
            priority=lane,
            dedupe_keys=[event.dedupe_key for event in events],
        )
        new_ids = set(session.scalars(select(Image.id).where(Image.scan_id == scan.id)))
        scan_id: uuid.UUID | None = scan.id
        if not new_ids:
            session.delete(scan)
            scan_id = None
    # An event repeated within one delivery is a duplicate of its first occurrence.
    duplicates: list[bool] = []
    fresh: list[uuid.UUID] = []
    for image_id in ids:
        is_new = image_id in new_ids
        duplicates.append(not is_new)
        if is_new:
            fresh.append(image_id)
            new_ids.discard(image_id)
    if fresh:
        ahead = realtime_share(pending, len(fresh), settings.realtime_burst) if lane == "realtime" else None
        publish_quietly(app or _default_app(), fresh, lane, ahead=ahead, chunk=settings.bulk_chunk)
    return EventIntake(scan_id, ids, duplicates, lane)


def _default_app() -> Celery:
    from .celery_app import app

    return app


def sweep_stale(
    sessions: sessionmaker[Session],
    app: Celery,
    *,
    stale_after_s: float,
    realtime_burst: int = 0,
    bulk_chunk: int = 1,
    batch: int = 1000,
    limit: int = 100_000,
) -> int:
    """Re-publish images left ``queued`` or ``processing`` longer than ``stale_after_s``.

    Touches ``updated_at`` of what it re-publishes, so the next sweep leaves
    them alone for another ``stale_after_s``. Rows are taken with SKIP LOCKED
    (on PostgreSQL), so two sweepers at once split the work instead of doubling it.
    Of each client's stale realtime images, the first ``realtime_burst`` go
    back to the realtime queue and the rest to overflow, as at intake; bulk
    images go back ``bulk_chunk`` to a message.
    """
    total = 0
    # Realtime images re-published per client during this sweep: one client's
    # lost flood must not come back in front of everyone else's images.
    sent_realtime: dict[uuid.UUID | None, int] = {}
    while total < limit:
        now = utcnow()
        cutoff = now - timedelta(seconds=stale_after_s)
        with sessions.begin() as session:
            rows = session.execute(
                select(Image.id, Image.client_id, Scan.priority)
                .join(Scan, Scan.id == Image.scan_id)
                .where(
                    Image.state.in_((QUEUED, PROCESSING)),
                    Image.updated_at < cutoff,
                    Scan.origin.not_in(IN_PROCESS_ORIGINS),
                )
                .order_by(Image.updated_at)
                .limit(batch)
                .with_for_update(skip_locked=True, of=Image)
            ).all()
            if rows:
                session.execute(
                    update(Image).where(Image.id.in_([r.id for r in rows])).values(updated_at=now)
                )
        bulk = [r.id for r in rows if r.priority == "bulk"]
        if bulk:
            publish(app, bulk, "bulk", chunk=bulk_chunk)
        realtime: dict[uuid.UUID | None, list[uuid.UUID]] = {}
        for r in rows:
            if r.priority == "realtime":
                realtime.setdefault(r.client_id, []).append(r.id)
        for client_id, ids in realtime.items():
            before = sent_realtime.get(client_id, 0)
            publish(app, ids, "realtime", ahead=realtime_share(before, len(ids), realtime_burst))
            sent_realtime[client_id] = before + len(ids)
        total += len(rows)
        if len(rows) < batch:
            break
    if total:
        log.info("sweeper re-published %d stale images", total)
    return total


def sweep_crops(sessions: sessionmaker[Session], app: Celery, *, stale_after_s: float, limit: int = 1000) -> int:
    """Ask again for the crops of reviews left ``pending`` longer than ``stale_after_s`` (a lost message,
    a broker that was down when the review was recorded); touches ``crops_at`` of those it sends."""
    now = utcnow()
    with sessions.begin() as session:
        ids = list(
            session.scalars(
                select(ImageReview.id)
                .where(
                    ImageReview.crops == CROPS_PENDING,
                    ImageReview.crops_at < now - timedelta(seconds=stale_after_s),
                )
                .order_by(ImageReview.crops_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        )
        if ids:
            session.execute(update(ImageReview).where(ImageReview.id.in_(ids)).values(crops_at=now))
    if ids and publish_crops(app, ids):
        log.info("sweeper asked again for the crops of %d reviews", len(ids))
    return len(ids)
