"""Intake: rows first. One transaction writes a scan and one ``queued`` image per object.

Publishing work (Celery messages carrying ids) happens only after that commit,
so the database always knows about every image a producer was promised.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Insert, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from .models import QUEUED, ApiClient, Image, Scan, utcnow
from .settings import Settings
from .storage import ObjectRef


def unique_refs(refs: Iterable[ObjectRef]) -> list[ObjectRef]:
    """The refs in their order, each object once."""
    seen: set[tuple[str | None, str, str | None]] = set()
    out: list[ObjectRef] = []
    for ref in refs:
        ident = (ref.bucket, ref.key, ref.version_id)
        if ident not in seen:
            seen.add(ident)
            out.append(ref)
    return out


def create_scan(
    session: Session,
    refs: Iterable[ObjectRef],
    *,
    origin: str,
    threshold: float,
    source: str | None = None,
    scan_threshold: float | None = None,
    client_id: uuid.UUID | None = None,
    priority: str = "realtime",
    callback_url: str | None = None,
    meta: dict[str, Any] | None = None,
    webhook_events: list[str] | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    dedupe_keys: Sequence[str] | None = None,
) -> tuple[Scan, list[uuid.UUID]]:
    """Add a scan and its images to ``session`` (the caller commits).

    ``threshold`` is the effective flag threshold each image keeps, so that a
    later change of defaults never rewrites the meaning of a stored result.

    ``dedupe_keys`` (one per ref, needs ``client_id``) makes intake
    idempotent per object: a ref whose key this client already has, or that
    repeats a key earlier in ``refs``, adds no image. The ids returned are then
    one per ref, in order: the new image's, or the one stored before under its
    key; the scan's ``image_count`` and ``pending_count`` count only new images.
    """
    request = {
        "origin": origin,
        "source": source,
        "priority": priority,
        "threshold": scan_threshold,
        "callback_url": callback_url,
        "meta": meta,
        "webhook_events": webhook_events,
        "idempotency_key": idempotency_key,
        "request_hash": request_hash,
    }
    if dedupe_keys is not None:
        return _create_deduplicated(
            session,
            list(refs),
            list(dedupe_keys),
            client_id=client_id,
            scan_fields=request,
            threshold=threshold,
        )
    objects = unique_refs(refs)
    now = utcnow()
    scan = _add_scan(
        session,
        now,
        client_id=client_id,
        image_count=len(objects),
        pending_count=len(objects),
        completed_at=now if not objects else None,
        **request,
    )
    ids = [uuid.uuid4() for _ in objects]
    if objects:
        session.execute(
            insert(Image),
            [
                _image_row(image_id, scan.id, client_id, ref, threshold, now)
                for image_id, ref in zip(ids, objects, strict=True)
            ],
        )
    return scan, ids


def effective_threshold(
    session: Session, settings: Settings, client_id: uuid.UUID | None, scan_threshold: float | None
) -> float:
    """The scan's threshold, else the client's default, else ``SYNTHGUARD_THRESHOLD``."""
    if scan_threshold is not None:
        return scan_threshold
    if client_id is not None:
        default = session.scalar(select(ApiClient.default_threshold).where(ApiClient.id == client_id))
        if default is not None:
            return float(default)
    return settings.threshold


def open_scan(
    session: Session,
    *,
    origin: str,
    source: str | None,
    priority: str,
    scan_threshold: float | None,
    client_id: uuid.UUID | None,
) -> uuid.UUID:
    """An empty scan that grows by :func:`add_images` (a backfill listing a prefix, page by page).

    Its ``pending_count`` starts at 1, a hold meaning "still adding": the caller
    releases it (:func:`release_pending`) when no more images come, so no worker
    can complete the scan before then.
    """
    scan = _add_scan(
        session,
        utcnow(),
        client_id=client_id,
        origin=origin,
        source=source,
        priority=priority,
        threshold=scan_threshold,
        image_count=0,
        pending_count=1,
    )
    return scan.id


def add_images(
    session: Session,
    scan_id: uuid.UUID,
    refs: Sequence[ObjectRef],
    *,
    threshold: float,
    client_id: uuid.UUID | None = None,
) -> list[uuid.UUID]:
    """Add ``queued`` images to an open scan and grow its counts (the caller commits)."""
    if not refs:
        return []
    now = utcnow()
    ids = [uuid.uuid4() for _ in refs]
    session.execute(
        insert(Image),
        [
            _image_row(image_id, scan_id, client_id, ref, threshold, now)
            for image_id, ref in zip(ids, refs, strict=True)
        ],
    )
    session.execute(
        update(Scan)
        .where(Scan.id == scan_id)
        .values(image_count=Scan.image_count + len(ids), pending_count=Scan.pending_count + len(ids))
    )
    return ids


def release_pending(session: Session, scan_id: uuid.UUID, count: int = 1) -> bool:
    """Count ``count`` of the scan's pending work as finished; True for the call that completes it.

    UPDATE ... RETURNING serialises on the scan's row, so exactly one writer
    sees zero and sets ``completed_at``.
    """
    # Core statements on the table: writers run this per batch, and the ORM adds only cost here.
    scans = Scan.__table__
    pending = session.execute(
        update(scans)
        .where(scans.c.id == scan_id)
        .values(pending_count=scans.c.pending_count - count)
        .returning(scans.c.pending_count)
    ).scalar_one()
    if pending != 0:
        return False
    session.execute(update(scans).where(scans.c.id == scan_id).values(completed_at=utcnow()))
    return True


def _add_scan(session: Session, now: datetime, **fields: Any) -> Scan:
    """A new scan row with these columns, flushed so that its images can point at it."""
    scan = Scan(id=uuid.uuid4(), created_at=now, **fields)
    session.add(scan)
    session.flush()
    return scan


def _image_row(
    image_id: uuid.UUID,
    scan_id: uuid.UUID,
    client_id: uuid.UUID | None,
    ref: ObjectRef,
    threshold: float,
    now: Any,
) -> dict[str, Any]:
    return {
        "id": image_id,
        "scan_id": scan_id,
        "client_id": client_id,
        "bucket": ref.bucket,
        "key": ref.key,
        "version_id": ref.version_id,
        "state": QUEUED,
        "threshold": threshold,
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
    }


def _insert_skipping_conflicts(session: Session) -> Insert:
    """``INSERT ... ON CONFLICT (client_id, dedupe_key) DO NOTHING`` in the session's dialect."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        stmt: Any = postgresql.insert(Image)
    elif dialect == "sqlite":
        stmt = sqlite.insert(Image)
    else:  # pragma: no cover - the two databases synthguard supports
        raise NotImplementedError(f"deduplicated intake is not supported on {dialect}")
    return stmt.on_conflict_do_nothing(index_elements=["client_id", "dedupe_key"])


def _create_deduplicated(
    session: Session,
    refs: list[ObjectRef],
    dedupe_keys: list[str],
    *,
    client_id: uuid.UUID | None,
    scan_fields: dict[str, Any],
    threshold: float,
) -> tuple[Scan, list[uuid.UUID]]:
    if len(refs) != len(dedupe_keys):
        raise ValueError("dedupe_keys needs exactly one key per ref")
    if client_id is None:
        # NULLs never conflict in a unique constraint: without a client nothing would be deduplicated.
        raise ValueError("dedupe_keys needs a client_id")
    objects: dict[str, ObjectRef] = {}
    for ref, key in zip(refs, dedupe_keys, strict=True):
        objects.setdefault(key, ref)
    now = utcnow()
    scan = _add_scan(session, now, client_id=client_id, **scan_fields)
    proposed = {key: uuid.uuid4() for key in objects}
    if objects:
        session.execute(
            _insert_skipping_conflicts(session),
            [
                {**_image_row(proposed[key], scan.id, client_id, ref, threshold, now), "dedupe_key": key}
                for key, ref in objects.items()
            ],
        )
    # Whoever holds each key now, this insert or an earlier one: that image is the answer.
    rows = session.execute(
        select(Image.dedupe_key, Image.id).where(
            Image.client_id == client_id, Image.dedupe_key.in_(list(objects))
        )
    )
    stored = {key: image_id for key, image_id in rows}
    ids = [stored[key] for key in dedupe_keys]
    inserted = sum(1 for key in objects if stored[key] == proposed[key])
    scan.image_count = scan.pending_count = inserted
    scan.completed_at = now if inserted == 0 else None
    session.flush()
    return scan, ids
