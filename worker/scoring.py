"""The engine: score one image by id, the plain function every entry point calls.

``synthguard scan`` calls :meth:`Scorer.process_image` from a thread pool; the
Celery task does the same for one message. The database row is the unit of
work: claiming it, storing its result and failing it are each one short
transaction, guarded so that a redelivered or duplicated run can never store a
second result.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from . import errors, logs, metrics, outbox
from .batching import BatcherClosed, MicroBatcher
from .db import make_engine, make_sessionmaker
from .detector import Detector
from .errors import PermanentError, SynthguardError, TransientError
from .imaging import decode_image
from .intake import release_pending
from .models import DONE, FAILED, PROCESSING, QUEUED, Image, utcnow
from .provenance import read_provenance
from .settings import Settings
from .storage import ObjectRef, Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreResult:
    """What scoring one object found; no database involved."""

    etag: str | None
    version_id: str | None
    sha256: str
    size_bytes: int
    format: str
    width: int
    height: int
    score: float
    provenance: dict[str, Any]
    provenance_ai: bool  # a strong signal says generative AI


@dataclass(frozen=True)
class Outcome:
    """The state an image is in after :meth:`Scorer.process_image`."""

    image_id: uuid.UUID
    state: str
    score: float | None = None
    flagged: bool | None = None
    error_code: str | None = None
    error_message: str | None = None
    # False when this call found the image already terminal (a redelivery).
    changed: bool = True


class Scorer:
    """One model, one micro-batcher, one S3 client and one session factory."""

    def __init__(
        self,
        settings: Settings,
        detector: Detector,
        *,
        sessions: sessionmaker[Session] | None = None,
        storage: Storage | None = None,
        allow_local: bool = False,
        on_outbox: Callable[[list[uuid.UUID]], None] | None = None,
    ) -> None:
        self.settings = settings
        # Only an operator's in-process scan may read files of this host; a
        # queue worker scores objects in storage and nothing else.
        self.allow_local = allow_local
        # Called after commit with new webhook delivery ids (the worker publishes them).
        self.on_outbox = on_outbox
        self.detector = detector
        self.storage = storage or Storage(settings)
        self.sessions = sessions or make_sessionmaker(make_engine(settings.database_url))
        # Each score comes back with its forward pass's start, to time the image's queue wait.
        self.batcher: MicroBatcher[Any, tuple[float, float]] = MicroBatcher(
            metrics.stamp_start(detector.predict),
            max_batch=settings.batch_size,
            max_wait_s=settings.batch_wait_ms / 1000.0,
            name="synthguard-batcher",
            on_batch=metrics.observe_batch,
        )
        self._closed = threading.Event()

    def close(self) -> None:
        """Finish the batch in flight and stop accepting images."""
        if not self._closed.is_set():
            self._closed.set()
            self.batcher.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ no database

    def score(self, ref: ObjectRef) -> ScoreResult:
        """Fetch, sniff, decode, preprocess, and wait for the batched forward pass."""
        stage = metrics.STAGE_SECONDS.labels
        with stage("fetch").time():
            fetched = self.storage.fetch(ref)
        with stage("decode").time():
            decoded = decode_image(
                fetched.data, max_pixels=self.settings.max_pixels, timeout_s=self.settings.decode_timeout_s
            )
        # Read beside the forward pass, from the bytes and pixels already in hand.
        with stage("provenance").time():
            findings = read_provenance(fetched.data, decoded.format, decoded.image)
        with stage("preprocess").time():
            tensor = self.detector.preprocess(decoded.image)
        try:
            submitted = time.monotonic()
            score, forward_started = self.batcher(tensor)
            stage("queue_wait").observe(max(0.0, forward_started - submitted))
        except SynthguardError:
            raise
        except BatcherClosed as exc:
            raise TransientError("the scorer is shutting down", code=errors.INFERENCE_FAILED) from exc
        except Exception as exc:
            # A failed forward pass (out of memory, a driver reset) is not the image's fault.
            raise TransientError(f"forward pass failed: {exc}", code=errors.INFERENCE_FAILED) from exc
        return ScoreResult(
            etag=fetched.etag,
            version_id=fetched.version_id,
            sha256=fetched.sha256,
            size_bytes=fetched.size,
            format=decoded.format,
            width=decoded.width,
            height=decoded.height,
            score=float(score),
            provenance=findings.to_json(),
            provenance_ai=findings.ai_strong,
        )

    # --------------------------------------------------------------- database

    def process_image(self, image_id: uuid.UUID) -> Outcome:
        """Take one image from ``queued``/``processing`` to ``done`` or ``failed``.

        Raises :class:`TransientError` when the caller should retry later (the
        image is back in ``queued``); after ``max_attempts`` the error is final
        and the image ``failed``. An image already terminal is left untouched.
        """
        try:
            return self._process(image_id)
        except DBAPIError as exc:
            if not isinstance(exc, OperationalError | InterfaceError) and not exc.connection_invalidated:
                raise
            # The database restarting or unreachable: the image keeps its state; try again later.
            raise TransientError(f"database unavailable: {exc.orig}", code=errors.DATABASE_UNAVAILABLE) from exc

    def _process(self, image_id: uuid.UUID) -> Outcome:
        claimed = self._claim(image_id)
        if claimed is None:
            return self._current(image_id)
        ref, attempts = claimed
        if ref.is_local and not self.allow_local:
            return self._fail(
                image_id, errors.ACCESS_DENIED, "local files are scored only by `synthguard scan`, not by workers"
            )
        try:
            result = self.score(ref)
        except PermanentError as exc:
            return self._fail(image_id, exc.code, exc.message)
        except Exception as exc:
            transient = exc if isinstance(exc, TransientError) else None
            code = transient.code if transient else errors.INTERNAL_ERROR
            message = transient.message if transient else f"{type(exc).__name__}: {exc}"
            if transient is None:
                log.exception("unexpected error scoring image %s", image_id)
            if attempts >= self.settings.max_attempts:
                return self._fail(image_id, code, f"{message} (gave up after {attempts} attempts)")
            self._requeue(image_id, code, message)
            if transient is not None:
                raise
            raise TransientError(message, code=code) from exc
        return self._store(image_id, result)

    def _claim(self, image_id: uuid.UUID) -> tuple[ObjectRef, int] | None:
        with self.sessions.begin() as session:
            row = session.execute(
                update(Image)
                .where(Image.id == image_id, Image.state.in_((QUEUED, PROCESSING)))
                .values(state=PROCESSING, attempts=Image.attempts + 1, updated_at=utcnow())
                .returning(Image.bucket, Image.key, Image.version_id, Image.attempts, Image.scan_id)
            ).one_or_none()
        if row is None:
            return None
        # The rest of this run logs with its scan; the key only where worker.logs allows it.
        logs.bind(image_id=image_id, scan_id=row.scan_id, bucket=row.bucket, object_key=row.key)
        return ObjectRef(bucket=row.bucket, key=row.key, version_id=row.version_id), int(row.attempts)

    def _store(self, image_id: uuid.UUID, result: ScoreResult) -> Outcome:
        detector = self.detector
        with metrics.STAGE_SECONDS.labels("store").time(), self.sessions.begin() as session:
            threshold = session.scalar(select(Image.threshold).where(Image.id == image_id))
            flagged = self._verdict(result, float(threshold))
            changed, completed = self._finish(
                session,
                image_id,
                state=DONE,
                etag=result.etag,
                version_id=result.version_id,
                sha256=result.sha256,
                size_bytes=result.size_bytes,
                format=result.format,
                width=result.width,
                height=result.height,
                score=result.score,
                flagged=flagged,
                model_name=detector.name,
                model_version=detector.version,
                provenance=result.provenance,
                error_code=None,
                error_message=None,
            )
            deliveries = self._outbox(session, image_id if changed and flagged else None, completed)
        self._publish(deliveries)
        if not changed:
            return self._current(image_id)
        # Counted only by the run that stored it: a redelivery scores nothing new.
        metrics.IMAGES_SCORED.labels("unknown" if flagged is None else str(flagged).lower()).inc()
        return Outcome(image_id, DONE, score=result.score, flagged=flagged)

    def _verdict(self, result: ScoreResult, threshold: float) -> bool | None:
        """Flagged when the score reaches the threshold, or a strong provenance signal says AI.

        Absence of provenance proves nothing and never lowers the verdict. An
        untrained model's score is no verdict at all: only provenance can flag then.
        """
        by_provenance = self.settings.provenance_flags and result.provenance_ai
        if self.detector.untrained:
            return True if by_provenance else None
        return result.score >= threshold or by_provenance

    def _fail(self, image_id: uuid.UUID, code: str, message: str) -> Outcome:
        with self.sessions.begin() as session:
            changed, completed = self._finish(
                session, image_id, state=FAILED, error_code=code, error_message=message
            )
            deliveries = self._outbox(session, None, completed)
        self._publish(deliveries)
        if not changed:
            return self._current(image_id)
        metrics.IMAGES_FAILED.labels(code).inc()
        return Outcome(image_id, FAILED, error_code=code, error_message=message)

    def _requeue(self, image_id: uuid.UUID, code: str, message: str) -> None:
        with self.sessions.begin() as session:
            session.execute(
                update(Image)
                .where(Image.id == image_id, Image.state == PROCESSING)
                .values(state=QUEUED, updated_at=utcnow(), error_message=f"retrying after {code}: {message}")
            )

    @staticmethod
    def _finish(session: Session, image_id: uuid.UUID, **values: Any) -> tuple[bool, uuid.UUID | None]:
        """Make the image terminal once: (True only for the call that did it, the scan it completed)."""
        now = utcnow()
        changed = session.execute(
            update(Image)
            .where(Image.id == image_id, Image.state.in_((QUEUED, PROCESSING)))
            .values(updated_at=now, completed_at=now, **values)
            .returning(Image.scan_id)
        ).one_or_none()
        if changed is None:
            return False, None
        completed = release_pending(session, changed.scan_id)
        return True, changed.scan_id if completed else None

    def _outbox(self, session: Session, flagged_image: uuid.UUID | None, completed_scan: uuid.UUID | None) -> list[uuid.UUID]:
        """Webhook deliveries decided by this transaction, written in it (transactional outbox)."""
        lease_s = self.settings.stale_after_s
        ids = [
            flagged_image and outbox.add_image_flagged(session, flagged_image, lease_s=lease_s),
            completed_scan and outbox.add_scan_completed(session, completed_scan, lease_s=lease_s),
        ]
        return [i for i in ids if i]

    def _publish(self, deliveries: list[uuid.UUID]) -> None:
        if deliveries and self.on_outbox is not None:
            try:
                self.on_outbox(deliveries)
            except Exception:  # the rows are committed: the sweeper sends them
                log.exception("could not publish webhook deliveries %s", deliveries)

    def _current(self, image_id: uuid.UUID) -> Outcome:
        with self.sessions() as session:
            image = session.get(Image, image_id)
            if image is None:
                raise LookupError(f"image {image_id} does not exist")
            return Outcome(
                image_id,
                image.state,
                score=image.score,
                flagged=image.flagged,
                error_code=image.error_code,
                error_message=image.error_message,
                changed=False,
            )


def process_with_retries(scorer: Scorer, image_id: uuid.UUID) -> Outcome:
    """Run :meth:`Scorer.process_image` in-process, backing off between transient failures.

    Bounded: ``process_image`` fails the image for good after ``max_attempts``.
    The Celery task does not use this: it hands the retry to the broker instead.
    """
    settings = scorer.settings
    attempt = 0
    while True:
        attempt += 1
        try:
            return scorer.process_image(image_id)
        except TransientError:
            time.sleep(
                errors.backoff_delay(attempt, base_s=settings.retry_backoff_s, cap_s=settings.retry_backoff_max_s)
            )
