"""Backfills: queue every object under an S3 prefix on the bulk lane, resumably.

A backfill may cover millions of objects and be interrupted, so it works page
by page: list a page, skip objects the database already has in hand, write the
rest as ``queued`` images of this run's one scan (rows first, one transaction
per page), then publish their ids. Running it again after an interruption
resumes: what is queued, processing, or done by the current model is skipped.

The scan's ``pending_count`` starts at 1, a hold meaning "still listing".
Workers may finish every image of the early pages while listing goes on; the
hold keeps the scan from completing until listing ends and the hold is
released with the same guarded decrement the scorer uses.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from .detector import checkpoint_version
from .errors import NotGranted, SynthguardError
from .intake import add_images, effective_threshold, open_scan, release_pending, unique_refs
from .models import DONE, PROCESSING, QUEUED, Image
from .queueing import publish
from .settings import Settings
from .storage import ObjectRef, Storage
from .tenancy import access_of, check_intake, require_access

log = logging.getLogger(__name__)

ORIGIN = "backfill"
LANE = "bulk"
DEFAULT_PAGE_SIZE = 1000
# Longest single sleep while rate limiting, so a stop request is noticed quickly.
_SLEEP_SLICE_S = 0.2
# Messages per publish call when rate limited: bounds the burst, amortises the producer.
_MAX_PUBLISH_CHUNK = 500


@dataclass
class BackfillResult:
    """What a backfill did so far; ``on_progress`` gets a copy after each page."""

    scan_id: uuid.UUID
    model_version: str
    listed: int = 0
    enqueued: int = 0  # rows written as queued
    skipped: int = 0
    published: int = 0  # of ``enqueued``; the rest are left to the sweeper
    pages: int = 0
    interrupted: bool = False

    def summary(self) -> dict[str, Any]:
        """The summary the CLI prints."""
        return {
            "scan_id": str(self.scan_id),
            "listed": self.listed,
            "enqueued": self.enqueued,
            "skipped": self.skipped,
            "model_version": self.model_version,
        }


class BackfillFailed(SynthguardError):
    """Listing or publishing failed part-way; ``result`` says what had been done."""

    def __init__(self, message: str, result: BackfillResult) -> None:
        super().__init__(message)
        self.result = result


class TokenBucket:
    """Allows ``rate`` tokens a second on average, in bursts of at most ``capacity``."""

    def __init__(
        self,
        rate: float,
        capacity: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = capacity if capacity is not None else max(1.0, rate)
        if self.capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.capacity
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def take(self, n: int, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Wait until ``n`` tokens are there and take them; False if stopped first."""
        if n > self.capacity:
            raise ValueError(f"cannot take {n} tokens at once from a bucket of {self.capacity}")
        while True:
            self._refill()
            if self._tokens >= n:
                self._tokens -= n
                return True
            if should_stop():
                return False
            self._sleep(min((n - self._tokens) / self.rate, _SLEEP_SLICE_S))


def run_backfill(
    settings: Settings,
    sessions: sessionmaker[Session],
    app: Celery,
    bucket: str,
    prefix: str = "",
    *,
    rate: float | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    threshold: float | None = None,
    client_id: uuid.UUID | None = None,
    on_progress: Callable[[BackfillResult], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    storage: Storage | None = None,
) -> BackfillResult:
    """Queue every object under ``s3://bucket/prefix`` not already queued, processing or
    done by the current model, as images of one new ``backfill`` scan on the bulk lane.

    ``rate`` caps publishing (images per second). ``should_stop`` is asked before
    each page is listed (and while waiting on the rate limit); when it says yes,
    listing stops, the page already committed stays committed, and the result
    has ``interrupted`` set. Committed rows whose messages were not sent are
    re-published by the sweeper. Raises :class:`BackfillFailed` when listing
    or publishing fails, and CheckpointError, before writing anything, when the
    configured checkpoint (needed for its version) cannot be had.

    With ``client_id`` the images are that client's (its API reads them, its
    webhooks announce them): the whole prefix must lie inside one of its
    grants and it must be allowed the bulk lane, else
    :class:`~worker.errors.NotGranted` or :class:`~worker.errors.LaneNotAllowed`
    before anything is listed; each page is checked again as it is written, so
    a grant revoked mid-run stops it. Its pending cap does not apply: a
    backfill is an operator's decision.
    """
    if page_size < 1:
        raise ValueError("page_size must be at least 1")
    if rate is not None and rate <= 0:
        raise ValueError("rate must be positive")
    stop = should_stop or (lambda: False)
    version = checkpoint_version(settings)
    storage = storage or Storage(settings)
    limiter = TokenBucket(rate) if rate is not None else None
    where = f"s3://{bucket}/{prefix}"

    with sessions.begin() as session:
        if client_id is not None:
            _require_prefix(session, client_id, bucket, prefix, settings)
        scan_id = open_scan(
            session, origin=ORIGIN, source=where, priority=LANE, scan_threshold=threshold, client_id=client_id
        )
        image_threshold = effective_threshold(session, settings, client_id, threshold)
    result = BackfillResult(scan_id=scan_id, model_version=version)

    try:
        pages = _pages(storage.list_prefix(bucket, prefix, page_size=page_size), page_size)
        while True:
            if stop():
                result.interrupted = True
                break
            try:
                page = next(pages, None)
            except SynthguardError as exc:
                raise BackfillFailed(f"cannot list {where}: {exc.message}", result) from exc
            if page is None:
                break
            try:
                ids = _commit_page(sessions, scan_id, bucket, page, version, image_threshold, client_id)
            except SynthguardError as exc:  # a grant revoked while listing
                raise BackfillFailed(exc.message, result) from exc
            result.pages += 1
            result.listed += len(page)
            result.enqueued += len(ids)
            result.skipped += len(page) - len(ids)
            if not _publish(app, ids, limiter, stop, result, settings.bulk_chunk):
                result.interrupted = True
            if on_progress is not None:
                on_progress(dataclasses.replace(result))
            if result.interrupted:
                break
    except BaseException:
        # Even a failed run must let its scan complete once its images are done.
        try:
            _end_listing(sessions, scan_id)
        except Exception:  # the original error is the one to report
            log.exception("could not end the listing of scan %s", scan_id)
        raise
    _end_listing(sessions, scan_id)
    return result


def _pages(refs: Iterator[ObjectRef], page_size: int) -> Iterator[list[ObjectRef]]:
    while page := list(itertools.islice(refs, page_size)):
        yield page


def _require_prefix(session: Session, client_id: uuid.UUID, bucket: str, prefix: str, settings: Settings) -> None:
    """The client may have every object under ``s3://bucket/prefix`` scored on the bulk lane."""
    access = access_of(session, client_id)
    inside = access.all_buckets or any(
        grant.bucket == bucket and prefix.startswith(grant.prefix) for grant in access.grants
    )
    if not inside:
        raise NotGranted(
            f"the client has no grant that covers all of s3://{bucket}/{prefix}; backfill a prefix inside "
            f"one of its grants, or grant it with `synthguard clients grant NAME {bucket}[/PREFIX]`",
            bucket=bucket,
            key=prefix,
        )
    check_intake(session, client_id, [], LANE, settings, enforce_caps=False)


def _needs_work(
    session: Session, bucket: str, page: Sequence[ObjectRef], version: str, client_id: uuid.UUID | None
) -> list[ObjectRef]:
    """The page's objects with no image that is queued, processing, or done by ``version``.

    For a client, only its own images count: another client's result is not one it can read.
    """
    query = select(Image.key, Image.version_id).where(
        Image.bucket == bucket,
        Image.key.in_({ref.key for ref in page}),
        or_(
            Image.state.in_((QUEUED, PROCESSING)),
            and_(Image.state == DONE, Image.model_version == version),
        ),
    )
    if client_id is not None:
        query = query.where(Image.client_id == client_id)
    rows = session.execute(query).all()
    versions: dict[str, set[str | None]] = {}
    for row in rows:
        versions.setdefault(row.key, set()).add(row.version_id)
    # A listing names no versions: it means each key's current one. A worker stores the
    # version it fetched on the row, so in a versioned bucket a NULL-only match would
    # queue every scored object again on each run; any version of the key counts then.
    return [
        ref
        for ref in unique_refs(page)
        if ref.key not in versions or (ref.version_id is not None and ref.version_id not in versions[ref.key])
    ]


def _commit_page(
    sessions: sessionmaker[Session],
    scan_id: uuid.UUID,
    bucket: str,
    page: Sequence[ObjectRef],
    version: str,
    threshold: float,
    client_id: uuid.UUID | None = None,
) -> list[uuid.UUID]:
    """Write the page's new images and grow the scan's counts, in one transaction."""
    with sessions.begin() as session:
        fresh = _needs_work(session, bucket, page, version, client_id)
        if not fresh:
            return []
        if client_id is not None:
            require_access(session, client_id, fresh)
        ids = add_images(session, scan_id, fresh, threshold=threshold, client_id=client_id)
    return ids


def _publish(
    app: Celery,
    ids: Sequence[uuid.UUID],
    limiter: TokenBucket | None,
    stop: Callable[[], bool],
    result: BackfillResult,
    bulk_chunk: int,
) -> bool:
    """Publish the page's ids within the rate limit, ``bulk_chunk`` to a message; False when stopped
    before all were sent."""
    if not ids:
        return True
    chunk = len(ids) if limiter is None else max(1, min(int(limiter.capacity), _MAX_PUBLISH_CHUNK))
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        if limiter is not None and not limiter.take(len(part), stop):
            return False
        try:
            result.published += publish(app, part, LANE, chunk=bulk_chunk)
        except Exception as exc:  # kombu raises many kinds; the rows are committed either way
            raise BackfillFailed(
                f"could not publish to the broker ({exc}); {result.enqueued - result.published} committed "
                "images will be published by the sweeper",
                result,
            ) from exc
    return True


def _end_listing(sessions: sessionmaker[Session], scan_id: uuid.UUID) -> None:
    """Release the listing hold, completing the scan if nothing else is pending."""
    with sessions.begin() as session:
        release_pending(session, scan_id)
