"""Intake: rows first. One transaction writes a scan and one ``queued`` image per object.

Publishing work (Celery messages carrying ids) happens only after that commit,
so the database always knows about every image a producer was promised.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from .models import QUEUED, Image, Scan, utcnow
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
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> tuple[Scan, list[uuid.UUID]]:
    """Add a scan and its images to ``session`` (the caller commits).

    ``threshold`` is the effective flag threshold each image keeps, so that a
    later change of defaults never rewrites the meaning of a stored result.
    """
    objects = unique_refs(refs)
    now = utcnow()
    scan = Scan(
        id=uuid.uuid4(),
        client_id=client_id,
        origin=origin,
        source=source,
        priority=priority,
        threshold=scan_threshold,
        callback_url=callback_url,
        meta=meta,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        image_count=len(objects),
        pending_count=len(objects),
        created_at=now,
        completed_at=now if not objects else None,
    )
    session.add(scan)
    session.flush()
    ids = [uuid.uuid4() for _ in objects]
    if objects:
        session.execute(
            insert(Image),
            [
                {
                    "id": image_id,
                    "scan_id": scan.id,
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
                for image_id, ref in zip(ids, objects, strict=True)
            ],
        )
    return scan, ids
