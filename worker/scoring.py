"""The engine: score one image by id, the plain function every entry point calls.

``synthguard scan`` calls :meth:`Scorer.process_image` from a thread pool; the
Celery task does the same for one message. The database row is the unit of
work: claiming it and failing it are each one short transaction, guarded so
that a redelivered or duplicated run can never store a second result. Results
are stored by a second micro-batcher: the images that finish together (one
forward pass) are written in one transaction, one commit for the lot.

A bulk message carries a chunk of ids (:meth:`Scorer.process_chunk`): one
statement claims them all, the images are scored one after another in the
calling thread, and one transaction stores their results.

Two shortcuts from the moderation loop run after the fetch: bytes this client
already had scored by this model reuse that result (``cached_from``), and every
image's PDQ hash is matched against its client's bank of known AI images
(``known_match``, worker.hashbank).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Self

import numpy as np
import torch
from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from . import errors, hashbank, logs, metrics, outbox, preparing
from .attribution import attribute
from .batching import BatcherClosed, MicroBatcher
from .db import database_unavailable, loggable, make_engine, make_sessionmaker, refusal
from .detector import Detector
from .device_decode import DeviceBatch, EncodedJpeg, Refused
from .errors import ImageNotFound, PermanentError, SynthguardError, TransientError
from .intake import release_pending
from .models import DONE, FAILED, PROCESSING, QUEUED, ApiClient, Image, Scan, utcnow
from .pdq import PdqHash
from .preparing import Prepared
from .priority import RealtimeFirst
from .provenance import watermark
from .quality import assess
from .sanitise import clean_text
from .settings import Settings
from .storage import FetchedObject, ObjectRef, Storage
from .tenancy import access_of
from .webhooks import EVENT_IMAGE_FLAGGED

log = logging.getLogger(__name__)

# Per-image statements go to the table (SQLAlchemy Core), not through the ORM.
_IMAGES = Image.__table__

# Longest error message stored on an image (worker.sanitise clips it).
MAX_ERROR_MESSAGE = 2000

# How long the result writer waits for more results after the first of a group.
# A forward pass hands back its whole batch at once and its threads reach the
# writer within about a millisecond of each other (measured on 2 cores, 8
# threads), while one commit costs several; 2 ms gathers such a cohort into one
# transaction. Results arriving while a transaction runs queue up for the next
# one regardless, so under load batches fill without this wait.
STORE_WAIT_S = 0.002


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
    # The perceptual hash; None for a reused result of an image stored before hashing existed.
    pdq: PdqHash | None = None
    # The image whose result this is, when its client had identical bytes scored before (Scorer._reused).
    cached_from: uuid.UUID | None = None
    # The bank entry it matched: {"image_id", "distance", ...} (worker.hashbank).
    known_match: dict[str, Any] | None = None
    # A JPEG's estimated quality (worker.quality); None for other formats.
    jpeg_quality: int | None = None
    # An animation's frames: {"count": frames in the file, "scored": [{"index", "score"}, ...]}; None for a still.
    frames: dict[str, Any] | None = None


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

    @classmethod
    def unchanged(cls, image_id: uuid.UUID, row: Any) -> Outcome:
        """The state ``row`` (an Image or a row with its columns) already holds; this call changed nothing."""
        return cls(
            image_id,
            row.state,
            score=row.score,
            flagged=row.flagged,
            error_code=row.error_code,
            error_message=row.error_message,
            changed=False,
        )


@dataclass(frozen=True)
class Claim:
    """An image taken for one attempt: its object, the attempt's number, whether its client may
    still reach it, and the message of its last error."""

    image_id: uuid.UUID
    scan_id: uuid.UUID
    client_id: uuid.UUID | None
    ref: ObjectRef
    attempts: int
    granted: bool
    last_error: str | None


@dataclass
class ChunkOutcome:
    """What :meth:`Scorer.process_chunk` did with a chunk's images."""

    done: int = 0
    failed: int = 0
    unchanged: int = 0  # already terminal, or not in the database: a redelivery
    # Back in queued after a transient error, each with its attempts so far: to be published again.
    retry: list[tuple[uuid.UUID, int, str]] = field(default_factory=list)
    # Claimed but not begun when realtime work was waiting: back in queued, the attempt not counted.
    handed_back: list[uuid.UUID] = field(default_factory=list)
    # Results of a chunk that handed back, still with the result writer (each resolves to an Outcome).
    storing: list[Future[Any]] = field(default_factory=list)

    def ended(self, outcome: Outcome) -> None:
        """Count an image failed here, or found terminal already."""
        if outcome.changed:
            self.failed += 1
        else:
            self.unchanged += 1

    def __str__(self) -> str:
        return (
            f"done={self.done} failed={self.failed} unchanged={self.unchanged} storing={len(self.storing)} "
            f"retry={len(self.retry)} handed_back={len(self.handed_back)}"
        )


class Scorer:
    """One model, two micro-batchers (forward passes, result writes), one S3 client, one session factory."""

    def __init__(
        self,
        settings: Settings,
        detector: Detector,
        *,
        sessions: sessionmaker[Session] | None = None,
        storage: Storage | None = None,
        allow_local: bool = False,
        on_outbox: Callable[[list[uuid.UUID]], None] | None = None,
        store_wait_s: float = STORE_WAIT_S,
    ) -> None:
        self.settings = settings
        # Only an operator's in-process scan may read files of this host; a
        # queue worker scores objects in storage and nothing else.
        self.allow_local = allow_local
        # Called after commit with new webhook delivery ids (the worker publishes them).
        self.on_outbox = on_outbox
        self.detector = detector
        # The short side of the model's input (timm's data config): smaller images get a quality hint.
        self.input_side = min(detector.data_config["input_size"][1:])
        self.storage = storage or Storage(settings)
        self.sessions = sessions or make_sessionmaker(make_engine(settings.database_url))
        # With SYNTHGUARD_DEVICE_DECODE, JPEGs reach the batcher as bytes and are decoded on the model's
        # device; a device that cannot decode them fails here, before any child process starts.
        forward = DeviceBatch(detector) if settings.device_decode else detector.predict
        # First to start anything: it may start child processes, and when it cannot, nothing else has started yet.
        self.preparer = preparing.make_preparer(
            settings,
            preparing.PrepareSpec.from_settings(settings, detector),
            on_replace=lambda reason: metrics.PREPARE_PROCESSES_LOST.labels(reason).inc(),
        )
        if self.preparer.processes and detector.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # The children take most cores; the model gets what they leave (an operator's OMP_NUM_THREADS wins).
            threads = preparing.cpu_model_threads(self.preparer.processes)
            torch.set_num_threads(threads)
            log.info("the CPU model runs %d intra-op thread(s) beside the preparing processes", threads)
        # Threads to feed this scorer with (the worker's pool, scan's): enough to keep the children busy.
        self.concurrency = preparing.feeding_threads(settings, self.preparer.processes)
        # Each score comes back with its forward pass's start, to time the image's queue wait.
        self.batcher: MicroBatcher[Any, tuple[Any, float]] = MicroBatcher(
            metrics.stamp_start(forward),
            max_batch=settings.batch_size,
            max_wait_s=settings.batch_wait_ms / 1000.0,
            name="synthguard-batcher",
            on_batch=metrics.observe_batch,
        )
        # Results of concurrent images go to the database together: one transaction, one commit.
        self.writer: MicroBatcher[tuple[uuid.UUID, ScoreResult], Outcome | Exception] = MicroBatcher(
            self._write_batch,
            max_batch=settings.batch_size,
            max_wait_s=store_wait_s,
            name="synthguard-writer",
        )
        # Realtime images first among this process's threads (worker.priority).
        self.lanes = RealtimeFirst()
        # Each client's bank of known AI images, held in memory and refreshed from the table.
        self.banks = hashbank.Banks(self.sessions, refresh_s=settings.bank_refresh_s)
        self._closed = threading.Event()

    def close(self) -> None:
        """Finish the batch in flight, store its results, and stop accepting images."""
        if not self._closed.is_set():
            self._closed.set()
            self.batcher.close()
            # After the forward batcher: the results of its last batch still get written.
            self.writer.close()
            self.preparer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ no database

    def score(
        self,
        ref: ObjectRef,
        *,
        realtime: bool = False,
        reuse: Callable[[FetchedObject], ScoreResult | None] | None = None,
    ) -> ScoreResult:
        """Fetch, sniff, decode, preprocess, hash, and wait for the batched forward pass.

        Realtime images go first: while one is here, other images wait at their
        next CPU stage (worker.priority), and its forward pass starts as soon as
        the model is free, without waiting for a batch to fill. ``reuse`` is
        asked, once the bytes are in hand, for an earlier result of the same
        bytes; when it has one, nothing else runs.
        """
        with self.lanes.realtime() if realtime else nullcontext():
            return self._score(ref, realtime=realtime, reuse=reuse)

    def _score(
        self, ref: ObjectRef, *, realtime: bool, reuse: Callable[[FetchedObject], ScoreResult | None] | None
    ) -> ScoreResult:
        stage = metrics.STAGE_SECONDS.labels

        def checkpoint() -> None:
            if not realtime and (waited := self.lanes.checkpoint()):
                stage("yield_to_realtime").observe(waited)

        with stage("fetch").time():
            fetched = self.storage.fetch(ref)
        if reuse is not None and (reused := reuse(fetched)) is not None:
            return reused
        checkpoint()
        # Decode, provenance, preprocess: in this thread, or in a preparing process (worker.preparing).
        prepared = self.preparer.prepare(fetched.data, urgent=realtime, checkpoint=checkpoint)
        spent = prepared.seconds
        frames: list[dict[str, Any]] | None = None
        try:
            submitted = time.monotonic()
            scored: tuple[float, float] | None = None
            if prepared.on_device:
                answer, forward_started = self.batcher(
                    EncodedJpeg(fetched.data, prepared.orientation, prepared.width * prepared.height), urgent=realtime
                )
                if isinstance(answer, Refused):
                    # Checked by libjpeg-turbo and refused by the device's decoder: decoded on the CPU instead.
                    log.info("the device could not decode a JPEG (%s); it goes through the CPU path", answer.reason)
                    metrics.DEVICE_DECODE_REFUSED.inc()
                    prepared = self.preparer.prepare(
                        fetched.data, urgent=realtime, checkpoint=checkpoint, on_device=False
                    )
                    # One observation per image: the check and the CPU path's stages together.
                    spent = tuple(map(sum, zip(spent, prepared.seconds, strict=True)))
                else:
                    prepared = _with_watermark(prepared, answer.watermark_bits)
                    scored = answer.score, forward_started
            _observe_stages(prepared, spent)
            if scored is None and prepared.frame_pixels:
                # Every frame into the batcher at once: they share forward passes with other images.
                pending = [self.batcher.submit(torch.from_numpy(prepared.pixels), urgent=realtime)]
                pending += [self.batcher.submit(torch.from_numpy(p), urgent=realtime) for p in prepared.frame_pixels]
                answers = [future.result() for future in pending]
                frames = [
                    {"index": index, "score": float(frame_score)}
                    for index, (frame_score, _) in zip(prepared.frame_indices, answers, strict=True)
                ]
                # The animation is as synthetic as its most synthetic frame.
                scored = max(a[0] for a in answers), min(a[1] for a in answers)
            elif scored is None:
                scored = self.batcher(torch.from_numpy(prepared.pixels), urgent=realtime)
            score, forward_started = scored
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
            format=prepared.format,
            width=prepared.width,
            height=prepared.height,
            score=float(score),
            provenance=prepared.provenance,
            provenance_ai=prepared.provenance_ai,
            pdq=prepared.pdq,
            jpeg_quality=prepared.jpeg_quality,
            frames=None if frames is None else {"count": prepared.frame_count, "scored": frames},
        )

    def _reused(self, client_id: uuid.UUID | None, fetched: FetchedObject) -> ScoreResult | None:
        """This client's earlier result for the same bytes and model, if there is one (the result cache).

        Only the client's own images are looked at, so a hit tells it nothing
        about other clients. Only originals are reused (``cached_from`` null),
        so every reuse names the image that was really scored.
        """
        columns = _IMAGES.c
        owner = columns.client_id.is_(None) if client_id is None else columns.client_id == client_id
        with self.sessions() as session:
            row = session.execute(
                select(
                    columns.id,
                    columns.format,
                    columns.width,
                    columns.height,
                    columns.score,
                    columns.provenance,
                    columns.pdq_forms,
                    columns.pdq_quality,
                    columns.quality,
                    columns.frames,
                )
                .where(
                    owner,
                    columns.sha256 == fetched.sha256,
                    columns.state == DONE,
                    columns.model_name == self.detector.name,
                    columns.model_version == self.detector.version,
                    columns.cached_from.is_(None),
                    columns.score.is_not(None),
                )
                .order_by(columns.completed_at)
                .limit(1)
            ).one_or_none()
        if row is None:
            return None
        provenance = row.provenance or {}
        return ScoreResult(
            etag=fetched.etag,
            version_id=fetched.version_id,
            sha256=fetched.sha256,
            size_bytes=fetched.size,
            format=row.format,
            width=row.width,
            height=row.height,
            score=float(row.score),
            provenance=provenance,
            provenance_ai=bool(provenance.get("ai")),
            pdq=None if row.pdq_forms is None else PdqHash.from_bytes(row.pdq_forms, int(row.pdq_quality or 0)),
            cached_from=row.id,
            # The hints are made again under this image's settings, from what the original measured.
            jpeg_quality=(row.quality or {}).get("jpeg_quality"),
            frames=row.frames,
        )

    def _known(self, client_id: uuid.UUID | None, result: ScoreResult) -> ScoreResult:
        """``result`` with the bank entry its hash matches, if any (hashes under the quality floor match nothing)."""
        pdq, settings = result.pdq, self.settings
        if pdq is None or pdq.quality < settings.bank_min_quality:
            return result
        with metrics.STAGE_SECONDS.labels("match").time():
            match = self.banks.nearest(client_id, pdq.forms, settings.bank_match_distance)
        if match is None:
            return result
        with self.sessions() as session:
            known = match.to_json(session, client_id)
        return replace(result, known_match=known)

    def _score_claim(self, claim: Claim, *, realtime: bool) -> ScoreResult:
        """Score a claimed image (or reuse the result of its bytes), then match it against its client's bank."""
        reuse = (
            (lambda fetched: self._reused(claim.client_id, fetched)) if self.settings.result_cache else None
        )
        with outage_is_transient():
            result = self.score(claim.ref, realtime=realtime, reuse=reuse)
            return self._known(claim.client_id, result)

    # --------------------------------------------------------------- database

    def process_image(self, image_id: uuid.UUID, *, realtime: bool = False) -> Outcome:
        """Take one image from ``queued``/``processing`` to ``done`` or ``failed``.

        Raises :class:`TransientError` when the caller should retry later (the
        image is back in ``queued``); after ``max_attempts`` the error is final
        and the image ``failed``. An image already terminal is left untouched.
        ``realtime``: the image came from the realtime lane and goes first (see
        :meth:`score`); its result is written at once, not batched with others.
        """
        with outage_is_transient():
            return self._process(image_id, realtime=realtime)

    def _process(self, image_id: uuid.UUID, *, realtime: bool) -> Outcome:
        claim = self._claim(image_id)
        if claim is None:
            return self._current(image_id)
        attempt = self._attempt(claim, realtime=realtime)
        if isinstance(attempt, Outcome):
            return attempt
        try:
            return self._store(image_id, attempt, alone=realtime)
        except (TransientError, LookupError):
            raise
        except Exception as exc:
            if isinstance(exc, DBAPIError) and database_unavailable(exc):
                raise
            return self._store_failed(image_id, exc)

    def process_chunk(
        self, image_ids: Sequence[uuid.UUID], *, should_yield: Callable[[], bool] | None = None
    ) -> ChunkOutcome:
        """Take a bulk chunk's images to ``done`` or ``failed``, one after another in this thread.

        One statement claims the chunk; one transaction stores the results it
        scored. Each image fails, retries or succeeds on its own, exactly as in
        :meth:`process_image`: images already terminal are left alone, and an
        image with a transient error goes back to ``queued`` and into
        ``retry`` for the caller to publish again. ``should_yield`` is asked
        between images; when it says realtime work waits, the images not begun
        go back to ``queued`` (their attempt not counted) and into
        ``handed_back``, and the results in hand go to the result writer
        without waiting for their commit (``storing``).

        Raises :class:`TransientError` when the database is unavailable: the
        chunk's images keep their state, and the caller retries the chunk.
        """
        with outage_is_transient():
            return self._process_chunk(list(dict.fromkeys(image_ids)), should_yield)

    def _process_chunk(
        self, image_ids: list[uuid.UUID], should_yield: Callable[[], bool] | None
    ) -> ChunkOutcome:
        claims = self._claim_chunk(image_ids)
        report = ChunkOutcome(unchanged=len(image_ids) - len(claims))
        scored: list[tuple[uuid.UUID, ScoreResult]] = []
        for index, claim in enumerate(claims):
            if index and should_yield is not None and should_yield():
                report.handed_back = [rest.image_id for rest in claims[index:]]
                self._unclaim(report.handed_back)
                break
            ref = claim.ref
            with logs.bound(image_id=claim.image_id, scan_id=claim.scan_id, bucket=ref.bucket, object_key=ref.key):
                try:
                    attempt = self._attempt(claim, realtime=False)
                except TransientError as exc:
                    report.retry.append((claim.image_id, claim.attempts, exc.code))
                    continue
            if isinstance(attempt, Outcome):
                report.ended(attempt)
            else:
                scored.append((claim.image_id, attempt))
        if scored and report.handed_back:
            self._store_later(scored, report)
        elif scored:
            self._store_chunk(scored, report)
        return report

    def _store_chunk(self, scored: list[tuple[uuid.UUID, ScoreResult]], report: ChunkOutcome) -> None:
        """Store a chunk's results in one transaction; count each image's end in ``report``.

        A lone result goes through the result writer instead, to share a
        transaction with other threads' results (chunks of one, a chunk's last image).
        """
        started = time.monotonic()
        answers: list[Outcome | Exception] = []
        if len(scored) == 1:
            try:
                answers = [self.writer(scored[0])]
            except BatcherClosed:
                pass
            except Exception as exc:  # noqa: BLE001 - the database's outage, accounted below
                answers = [exc]
        if not answers:
            answers = list(self._write_batch(scored))
        waited = time.monotonic() - started
        stage = metrics.STAGE_SECONDS.labels("store")
        for (image_id, _), answer in zip(scored, answers, strict=True):
            stage.observe(waited)
            self._account(image_id, answer, report)

    def _store_later(self, scored: list[tuple[uuid.UUID, ScoreResult]], report: ChunkOutcome) -> None:
        """Hand a chunk's results to the result writer and return at once; ``report.storing`` has them.

        For a chunk that hands back: its thread is wanted for realtime work now.
        A worker killed before the writer commits leaves these images
        ``processing``, and the sweeper brings them back, as for any image in flight.
        """
        for image_id, result in scored:
            try:
                future = self.writer.submit((image_id, result))
            except BatcherClosed:
                self._store_chunk([(image_id, result)], report)
                continue
            future.add_done_callback(lambda done, image_id=image_id: self._stored_later(image_id, done))
            report.storing.append(future)

    def _stored_later(self, image_id: uuid.UUID, done: Future[Any]) -> None:
        # In the writer's thread, once the result's transaction has ended.
        late = ChunkOutcome()
        error = done.exception()
        self._account(image_id, error if isinstance(error, Exception) else done.result(), late)
        if late.retry:
            log.warning("image %s: its result was not stored (database unavailable); the sweeper brings it back", image_id)

    def _account(self, image_id: uuid.UUID, answer: Outcome | Exception, report: ChunkOutcome) -> None:
        """Count how storing one image's result ended, and fail the image where it was refused."""
        if isinstance(answer, Outcome):
            if answer.changed:
                report.done += 1
                _count_scored(answer)
            else:
                report.unchanged += 1
        elif isinstance(answer, LookupError):
            report.unchanged += 1
        elif isinstance(answer, TransientError) or database_unavailable(answer):
            # The database went away after the items before it committed: this one stays
            # processing, and comes back when published again (or by the sweeper).
            report.retry.append((image_id, 0, errors.DATABASE_UNAVAILABLE))
        else:
            report.ended(self._store_failed(image_id, answer))

    def _attempt(self, claim: Claim, *, realtime: bool) -> ScoreResult | Outcome:
        """Score a claimed image: its result, or the Outcome of failing it.

        Raises :class:`TransientError` when it should be tried again later (the
        image is back in ``queued``); after ``max_attempts`` the error is final.
        """
        image_id, attempts = claim.image_id, claim.attempts
        if attempts > self.settings.max_attempts:
            # Every attempt ended without a terminal state: killed, out of memory, or an error that
            # escaped the handling below. Checked where work is claimed, so no path can loop.
            return self._fail(
                image_id,
                errors.TOO_MANY_ATTEMPTS,
                f"gave up after {attempts - 1} attempts; last error: "
                f"{claim.last_error or 'none recorded (the worker stopped during each attempt: killed or out of memory)'}",
            )
        if claim.ref.is_local and not self.allow_local:
            return self._fail(
                image_id, errors.ACCESS_DENIED, "local files are scored only by `synthguard scan`, not by workers"
            )
        if not claim.granted:
            # Checked before the fetch: the worker's credentials never touch an object the client lost.
            return self._fail(
                image_id,
                errors.ACCESS_DENIED,
                "the API client is disabled or no longer has a grant for this object; it was not fetched",
            )
        try:
            return self._score_claim(claim, realtime=realtime)
        except PermanentError as exc:
            return self._fail(image_id, exc.code, exc.message)
        except TransientError as exc:
            if attempts >= self.settings.max_attempts:
                return self._fail(image_id, exc.code, f"{exc.message} (gave up after {attempts} attempts)")
            self._requeue(image_id, exc.code, exc.message)
            raise
        except Exception as exc:
            # Not an outage and not a verdict on the image: a bug met by this image. It fails
            # alone, now; retrying the same bytes would meet the same bug.
            log.exception("unexpected error scoring image %s", image_id)
            return self._fail(image_id, errors.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")

    def _store_failed(self, image_id: uuid.UUID, exc: Exception) -> Outcome:
        """Fail an image whose result could not be stored: a value the database refuses, or a bug.

        This image's fault alone; its batch-mates are stored without it.
        """
        if isinstance(exc, DBAPIError):
            # Its message quotes the refused value: the log gets the statement, the image the reason.
            log.error("storing the result of image %s failed: %s", image_id, loggable(exc))
            reason = refusal(exc)
        else:
            log.error("storing the result of image %s failed", image_id, exc_info=exc)
            reason = f"{type(exc).__name__}: {exc}"
        return self._fail(image_id, errors.INTERNAL_ERROR, f"storing the result failed: {reason}")

    # Columns a claim reads back from the row it takes.
    _CLAIMED = (
        _IMAGES.c.id,
        _IMAGES.c.bucket,
        _IMAGES.c.key,
        _IMAGES.c.version_id,
        _IMAGES.c.attempts,
        _IMAGES.c.scan_id,
        _IMAGES.c.client_id,
        _IMAGES.c.error_message,
    )

    def _claim(self, image_id: uuid.UUID) -> Claim | None:
        """Take the image for this attempt; None when it is terminal or not there."""
        with self.sessions.begin() as session:
            # A Core statement on the table: this runs once per image, and the ORM's bulk-update
            # bookkeeping around it cost the worker's GIL more than the statement itself.
            row = session.execute(
                update(_IMAGES)
                .where(_IMAGES.c.id == image_id, _IMAGES.c.state.in_((QUEUED, PROCESSING)))
                .values(state=PROCESSING, attempts=_IMAGES.c.attempts + 1, updated_at=utcnow())
                .returning(*self._CLAIMED)
            ).one_or_none()
            claims = self._claims(session, [row] if row is not None else [])
        if not claims:
            return None
        # The rest of this run logs with its scan; the key only where worker.logs allows it.
        logs.bind(image_id=image_id, scan_id=row.scan_id, bucket=row.bucket, object_key=row.key)
        return claims[0]

    def _claim_chunk(self, image_ids: list[uuid.UUID]) -> list[Claim]:
        """Take every image of a chunk that is not terminal, in one statement; in the chunk's order."""
        if not image_ids:
            return []
        columns = _IMAGES.c
        # Rows locked in id order, as every other writer takes them (see _lock_images).
        takeable = (
            select(columns.id)
            .where(columns.id.in_(image_ids), columns.state.in_((QUEUED, PROCESSING)))
            .order_by(columns.id)
            .with_for_update(key_share=True)
        )
        with self.sessions.begin() as session:
            rows = session.execute(
                update(_IMAGES)
                .where(columns.id.in_(takeable.scalar_subquery()), columns.state.in_((QUEUED, PROCESSING)))
                .values(state=PROCESSING, attempts=columns.attempts + 1, updated_at=utcnow())
                .returning(*self._CLAIMED)
            ).all()
            claims = {claim.image_id: claim for claim in self._claims(session, rows)}
        return [claims[image_id] for image_id in image_ids if image_id in claims]

    @staticmethod
    def _claims(session: Session, rows: Sequence[Any]) -> list[Claim]:
        """Claims of the rows just taken, each held to its client's grants as they are now."""
        grants: dict[uuid.UUID, Any] = {}
        claims = []
        for row in rows:
            # Images without a client are an operator's (CLI); a client's S3 objects are held to its
            # grants now, not as they were at intake. Local files answer to allow_local instead.
            granted = row.client_id is None or row.bucket is None
            if not granted:
                if row.client_id not in grants:
                    grants[row.client_id] = access_of(session, row.client_id)
                granted = grants[row.client_id].allows(row.bucket, row.key)
            claims.append(
                Claim(
                    image_id=row.id,
                    scan_id=row.scan_id,
                    client_id=row.client_id,
                    ref=ObjectRef(bucket=row.bucket, key=row.key, version_id=row.version_id),
                    attempts=int(row.attempts),
                    granted=granted,
                    last_error=row.error_message,
                )
            )
        return claims

    def _unclaim(self, image_ids: list[uuid.UUID]) -> None:
        """Give back claimed images not begun: ``queued`` again, the claim's attempt taken back."""
        with self.sessions.begin() as session:
            session.execute(
                update(_IMAGES)
                .where(_IMAGES.c.id.in_(image_ids), _IMAGES.c.state == PROCESSING)
                .values(state=QUEUED, attempts=_IMAGES.c.attempts - 1, updated_at=utcnow())
            )

    def _store(self, image_id: uuid.UUID, result: ScoreResult, *, alone: bool = False) -> Outcome:
        """Store one result and wait for its transaction to commit.

        Through the writer, batched with other images' results; ``alone``: in
        this thread, in a transaction of its own, without waiting for a batch.
        """
        with metrics.STAGE_SECONDS.labels("store").time():
            if alone:
                (answer,) = self._write_batch([(image_id, result)])
            else:
                try:
                    answer = self.writer((image_id, result))
                except BatcherClosed:
                    # Closed under a late caller: the result is in hand, so store it alone rather than retry.
                    (answer,) = self._write_batch([(image_id, result)])
        if isinstance(answer, Exception):
            raise answer
        if answer.changed:
            _count_scored(answer)
        return answer

    def _write_batch(self, items: list[tuple[uuid.UUID, ScoreResult]]) -> list[Outcome | Exception]:
        """The writer's batch function: one answer per item, an Outcome or the error for that item alone.

        An error that is the database's (down, restarting) fails the whole
        batch, so every caller retries. Any other error may be one row's fault
        (a value the column refuses): then each item is written alone, so that
        one bad result cannot keep failing the images batched with it.
        """
        try:
            return self._write(items)
        except Exception as exc:
            if len(items) == 1 or database_unavailable(exc):
                raise
            log.warning("storing %d results together failed (%s); storing them one by one", len(items), exc)
        answers: list[Outcome | Exception] = []
        outage: Exception | None = None
        for item in items:
            if outage is not None:
                # The database went away meanwhile: the rest retry later, without waiting on it here.
                answers.append(outage)
                continue
            try:
                answers.extend(self._write([item]))
            except Exception as exc:  # noqa: BLE001 - handed to that item's caller, whatever it is
                # Its own error for each caller: those written before an outage did commit.
                answers.append(exc)
                outage = exc if database_unavailable(exc) else None
        return answers

    def _write(self, items: list[tuple[uuid.UUID, ScoreResult]]) -> list[Outcome | Exception]:
        """Store every result of ``items`` in one transaction, then publish its webhook deliveries.

        Per image exactly as one transaction each would: only the item that
        moves an image from ``queued``/``processing`` to ``done`` changes it
        (later items for the same image, and images already terminal, get its
        current state, ``changed=False``); each scan's ``pending_count`` drops
        once by the images it lost here, and the write that reaches zero
        completes the scan.
        """
        writer_of: dict[uuid.UUID, int] = {}  # image -> the item that stores it
        answers: dict[uuid.UUID, Outcome] = {}
        with self.sessions.begin() as session:
            rows = self._lock_images(session, sorted({image_id for image_id, _ in items}))
            changes: list[dict[str, Any]] = []
            released: dict[uuid.UUID, int] = {}
            for index, (image_id, result) in enumerate(items):
                row = rows.get(image_id)
                if row is None or image_id in answers:
                    continue
                if row.state not in (QUEUED, PROCESSING):
                    answers[image_id] = Outcome.unchanged(image_id, row)
                    continue
                flagged, flagged_by = self._verdict(result, float(row.threshold))
                writer_of[image_id] = index
                answers[image_id] = Outcome(image_id, DONE, score=result.score, flagged=flagged)
                released[row.scan_id] = released.get(row.scan_id, 0) + 1
                changes.append({"image_id": image_id, **self._stored_values(result, flagged, flagged_by)})
            self._mark_done(session, changes)
            completed = [scan for scan in sorted(released) if release_pending(session, scan, released[scan])]
            flagged_ids = [image_id for image_id in sorted(writer_of) if answers[image_id].flagged]
            deliveries = self._announce(session, rows, sorted(released), flagged_ids, completed)
        for index in writer_of.values():
            stored = items[index][1]
            if stored.cached_from is not None:
                metrics.IMAGES_CACHED.inc()
            if stored.known_match is not None:
                metrics.KNOWN_MATCHES.inc()
        self._publish(deliveries)
        out: list[Outcome | Exception] = []
        for index, (image_id, _) in enumerate(items):
            answer = answers.get(image_id)
            if answer is None:
                out.append(ImageNotFound(f"image {image_id} does not exist"))
            elif writer_of.get(image_id, index) != index:
                out.append(replace(answer, changed=False))  # a duplicate of an image stored in this batch
            else:
                out.append(answer)
        return out

    @staticmethod
    def _lock_images(session: Session, image_ids: list[uuid.UUID]) -> dict[uuid.UUID, Any]:
        """The images' current state, their rows locked until the transaction ends.

        Locks rows in id order, and scans (release_pending) in id order after all
        images: every writer (batches, _fail, other processes) takes them in one
        global order, so none waits on another in a cycle. NO KEY UPDATE is what
        the UPDATE takes anyway; it leaves foreign-key checks of concurrent inserts
        unblocked.
        """
        columns = _IMAGES.c
        return {
            row.id: row
            for row in session.execute(
                select(
                    columns.id,
                    columns.scan_id,
                    columns.state,
                    columns.threshold,
                    columns.score,
                    columns.flagged,
                    columns.error_code,
                    columns.error_message,
                )
                .where(columns.id.in_(image_ids))
                .order_by(columns.id)
                .with_for_update(key_share=True)
            )
        }

    def _stored_values(self, result: ScoreResult, flagged: bool | None, flagged_by: list[str] | None) -> dict[str, Any]:
        """The columns one result sets, keyed by their bind names in :meth:`_mark_done`."""
        return {
            "etag": result.etag,
            "version_id": result.version_id,
            "sha256": result.sha256,
            "size_bytes": result.size_bytes,
            "format": result.format,
            "width": result.width,
            "height": result.height,
            "score": result.score,
            "flagged": flagged,
            "flagged_by": flagged_by,
            "model_name": self.detector.name,
            "model_version": self.detector.version,
            "provenance": result.provenance,
            "cached_from": result.cached_from,
            "pdq": None if result.pdq is None else result.pdq.hex,
            "pdq_quality": None if result.pdq is None else result.pdq.quality,
            "pdq_forms": None if result.pdq is None else b"".join(result.pdq.forms),
            "known_match": result.known_match,
            "generator": None if (found := attribute(result.provenance)) is None else found.to_json(),
            "frames": result.frames,
            "quality": assess(
                result.width,
                result.height,
                result.jpeg_quality,
                input_side=self.input_side,
                min_jpeg_quality=self.settings.min_jpeg_quality,
            ).to_json(),
        }

    @staticmethod
    def _mark_done(session: Session, changes: list[dict[str, Any]]) -> None:
        """One UPDATE executed for every changed image (psycopg pipelines them): few round trips."""
        if not changes:
            return
        now = utcnow()
        columns = [name for name in changes[0] if name != "image_id"]
        # Bind names must differ from column names in an UPDATE ... WHERE with bindparams.
        params = [
            {"image_id": change["image_id"], **{f"v_{name}": change[name] for name in columns}}
            for change in sorted(changes, key=lambda change: change["image_id"])
        ]
        session.execute(
            update(_IMAGES)
            .where(_IMAGES.c.id == bindparam("image_id"))
            .values(state=DONE, updated_at=now, completed_at=now, error_code=None, error_message=None)
            .values({name: bindparam(f"v_{name}") for name in columns}),
            params,
        )

    def _announce(
        self,
        session: Session,
        rows: dict[uuid.UUID, Any],
        scan_ids: list[uuid.UUID],
        flagged_ids: list[uuid.UUID],
        completed: list[uuid.UUID],
    ) -> list[uuid.UUID]:
        """Outbox rows for the images flagged and the scans completed by this transaction."""
        if flagged_ids:
            # Only where image.flagged events have somewhere to go: a client without a
            # webhook pays one small query per batch, not an image and a scan loaded per image.
            wanted = outbox.scans_wanting(session, scan_ids, EVENT_IMAGE_FLAGGED)
            flagged_ids = [image_id for image_id in flagged_ids if rows[image_id].scan_id in wanted]
        if not flagged_ids and not completed:
            return []
        # Loaded once, after the writes, and held here: the session's identity map is weak,
        # and the outbox helpers would otherwise select image, scan and client again per event.
        scans = list(session.scalars(select(Scan).where(Scan.id.in_(scan_ids))))
        client_ids = sorted({scan.client_id for scan in scans if scan.client_id is not None})
        held: list[Any] = [
            *scans,
            *session.scalars(select(ApiClient).where(ApiClient.id.in_(client_ids))),
            *session.scalars(select(Image).where(Image.id.in_(flagged_ids))),
        ]
        deliveries: list[uuid.UUID] = []
        for image_id in flagged_ids:
            deliveries += self._outbox(session, image_id, None)
        for scan_id in completed:
            deliveries += self._outbox(session, None, scan_id)
        del held
        return deliveries

    def _verdict(self, result: ScoreResult, threshold: float) -> tuple[bool | None, list[str] | None]:
        """Whether the image is flagged, and what flagged it: ``score``, ``provenance``, ``known_match``.

        Flagged when the score reaches the threshold, a strong provenance signal
        says AI, or the image matches its client's bank. Absence of provenance
        or of a match proves nothing and never lowers the verdict. An untrained
        model's score is no verdict at all: only provenance or a match can flag then.
        """
        settings = self.settings
        reasons = [
            reason
            for reason, hit in (
                ("score", not self.detector.untrained and result.score >= threshold),
                ("provenance", settings.provenance_flags and result.provenance_ai),
                ("known_match", settings.bank_flags and result.known_match is not None),
            )
            if hit
        ]
        if reasons:
            return True, reasons
        return (None if self.detector.untrained else False), None

    def _fail(self, image_id: uuid.UUID, code: str, message: str) -> Outcome:
        # Messages may quote the file (a decoder's complaint, a metadata value): one boundary.
        message = clean_text(message, MAX_ERROR_MESSAGE)
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
        message = clean_text(f"retrying after {code}: {message}", MAX_ERROR_MESSAGE)
        with self.sessions.begin() as session:
            session.execute(
                update(Image)
                .where(Image.id == image_id, Image.state == PROCESSING)
                .values(state=QUEUED, updated_at=utcnow(), error_message=message)
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
        ids: list[uuid.UUID | None] = []
        if flagged_image is not None:
            ids.append(outbox.add_image_flagged(session, flagged_image, lease_s=lease_s))
        if completed_scan is not None:
            ids.append(outbox.add_scan_completed(session, completed_scan, lease_s=lease_s))
        return [delivery_id for delivery_id in ids if delivery_id is not None]

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
                raise ImageNotFound(f"image {image_id} does not exist")
            return Outcome.unchanged(image_id, image)


def _observe_stages(prepared: Prepared, spent: Sequence[float]) -> None:
    for name, seconds in zip(preparing.STAGES, spent, strict=True):
        if name != "hash" or prepared.pdq is not None:  # not hashed (SYNTHGUARD_PDQ_HASH off): no stage
            metrics.STAGE_SECONDS.labels(name).observe(seconds)


def _with_watermark(prepared: Prepared, bits: np.ndarray | None) -> Prepared:
    """``prepared``'s provenance completed by the watermark's block bits the device read."""
    assert prepared.device_findings is not None
    findings = prepared.device_findings.with_signal(watermark.signal(bits))
    return replace(prepared, provenance=findings.to_json(), provenance_ai=findings.ai_strong, device_findings=None)


@contextmanager
def outage_is_transient() -> Iterator[None]:
    """The database restarting or unreachable becomes a TransientError: the image keeps its state; try later."""
    try:
        yield
    except DBAPIError as exc:
        if not database_unavailable(exc):
            raise
        raise TransientError(f"database unavailable: {exc.orig}", code=errors.DATABASE_UNAVAILABLE) from exc


def _count_scored(outcome: Outcome) -> None:
    """Count an image stored as done; only by the run that stored it (a redelivery scores nothing new)."""
    flagged = outcome.flagged
    metrics.IMAGES_SCORED.labels("unknown" if flagged is None else str(flagged).lower()).inc()


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
