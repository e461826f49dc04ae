"""Celery tasks: thin. Load by id, call the plain function, decide retry."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from celery import Task
from celery.signals import task_postrun, task_prerun, worker_shutdown
from celery.worker import state as worker_state
from celery.worker.control import inspect_command

from . import errors, logs, metrics
from .celery_app import (
    BANK_CROPS_TASK,
    BULK_QUEUE,
    DELIVER_TASK,
    REALTIME_QUEUE,
    SCORE_CHUNK_TASK,
    SCORE_TASK,
    SWEEP_TASK,
    app,
)
from .errors import TransientError, backoff_delay
from .netguard import URLPolicy
from .outbox import due, send_delivery
from .priority import BulkSlots, WaitingProbe
from .queueing import publish_deliveries, publish_quietly, sweep_crops, sweep_stale, waiting_messages
from .secretbox import SecretBox
from .settings import get_settings

if TYPE_CHECKING:  # the model stack is imported where images are scored: beat imports this module too
    from .scoring import Scorer

log = logging.getLogger(__name__)

_scorer: Scorer | None = None
_scorer_lock = threading.Lock()
# Asked between the images of a bulk chunk: do realtime messages wait for a free thread here?
_realtime_waiting: WaitingProbe | None = None
# Bulk chunks scored at once by a worker that takes both lanes; None: no thread stands by.
_bulk_slots: BulkSlots | None = None
_bulk_slots_built = False


def _publish_new_deliveries(ids: list[uuid.UUID]) -> None:
    publish_deliveries(app, [(delivery_id, 1) for delivery_id in ids])


def install_scorer(scorer: Scorer) -> None:
    """Use ``scorer`` in this process (``synthguard worker`` loads the model before consuming)."""
    global _scorer
    scorer.on_outbox = _publish_new_deliveries
    metrics.set_model(scorer.detector)
    metrics.watch_preparer(scorer.preparer)
    with _scorer_lock:
        _scorer = scorer


def get_scorer() -> Scorer:
    """The process's one Scorer, built from the environment on first use."""
    global _scorer
    with _scorer_lock:
        if _scorer is None:
            from .detector import Detector
            from .scoring import Scorer

            settings = get_settings()
            _scorer = Scorer(settings, Detector.from_settings(settings), on_outbox=_publish_new_deliveries)
            metrics.set_model(_scorer.detector)
            metrics.watch_preparer(_scorer.preparer)
        return _scorer


@worker_shutdown.connect
def _close_scorer(**_: object) -> None:
    # Warm shutdown has already waited for running tasks; this stops the batching thread.
    if _scorer is not None:
        _scorer.close()


# What the first argument of each task names, for the log context.
_SUBJECT_FIELD = {SCORE_TASK: "image_id", DELIVER_TASK: "delivery_id", BANK_CROPS_TASK: "review_id"}


@task_prerun.connect
def _bind_log_context(
    task_id: str, task: Task, args: tuple[object, ...] = (), kwargs: dict[str, object] | None = None, **_: object
) -> None:
    # A task run is one request: every line it logs carries these ids (worker.logs).
    logs.clear()
    field = _SUBJECT_FIELD.get(task.name)
    subject = (args[0] if args else (kwargs or {}).get(field)) if field else None
    logs.bind(task_id=task_id, **({field: subject} if field else {}))


@task_postrun.connect
def _clear_log_context(**_: object) -> None:
    # The pool thread runs another task next; its ids must not carry over.
    logs.clear()


@app.task(name=SCORE_TASK, bind=True, max_retries=None)
def score_image(self: Task, image_id: str) -> str:
    """Score one image by id; transient failures come back later with backoff and jitter."""
    scorer = get_scorer()
    # Overflow images (a client past its realtime burst) are batched and yield like bulk ones.
    realtime = (self.request.delivery_info or {}).get("routing_key") == REALTIME_QUEUE
    try:
        outcome = scorer.process_image(uuid.UUID(image_id), realtime=realtime)
    except TransientError as exc:
        settings = scorer.settings
        delay = backoff_delay(
            self.request.retries + 1, base_s=settings.retry_backoff_s, cap_s=settings.retry_backoff_max_s
        )
        # exc.message may name the object key; worker.logs scrubs it unless keys may be logged.
        log.info("image %s: %s (%s); retrying in %.1fs", image_id, exc.code, exc.message, delay)
        metrics.IMAGES_RETRIED.labels(exc.code).inc()
        raise self.retry(exc=exc, countdown=delay) from exc
    except LookupError:
        log.warning("image %s is not in the database; message dropped", image_id)
        return "missing"
    except Exception:
        # Scorer.process_image fails the image itself wherever it can; what still escapes (its
        # database refusing even that) leaves the row in place: the sweeper brings it back, and
        # the claim ends it as too_many_attempts once its attempts are spent.
        log.exception("image %s: unexpected error; the sweeper will bring it back", image_id)
        metrics.IMAGES_RETRIED.labels(errors.INTERNAL_ERROR).inc()
        return "error"
    return outcome.state


def _realtime_probe() -> WaitingProbe | None:
    """Whether realtime messages wait for this worker; None when it does not consume realtime work."""
    global _realtime_waiting
    if REALTIME_QUEUE not in app.amqp.queues.consume_from:
        return None  # a bulk worker: realtime messages are some other worker's to take
    with _scorer_lock:
        if _realtime_waiting is None:
            _realtime_waiting = WaitingProbe(lambda: waiting_messages(app, REALTIME_QUEUE))
        return _realtime_waiting


def _stopping() -> bool:
    # Warm shutdown (SIGTERM) waits for running tasks: the rest of a chunk goes back instead.
    return worker_state.should_stop is not None or worker_state.should_terminate is not None


def _chunk_should_yield(slots: BulkSlots | None) -> Callable[[], bool]:
    """Asked between a chunk's images: stop here when the worker is stopping, or when more realtime
    messages wait than threads stand by to take them."""
    realtime_waits = _realtime_probe()

    def should_yield() -> bool:
        if _stopping():
            return True
        if realtime_waits is None:
            return False
        standing_by = slots.standing_by if slots is not None else 0
        return realtime_waits() > standing_by

    return should_yield


def _standby_slots(scorer: Scorer) -> BulkSlots | None:
    """This worker's bulk slots: all threads but ``SYNTHGUARD_REALTIME_STANDBY`` where it consumes
    both lanes; None where no thread stands by."""
    global _bulk_slots, _bulk_slots_built
    with _scorer_lock:
        if not _bulk_slots_built:
            consumed = app.amqp.queues.consume_from or {}
            standby = scorer.settings.realtime_standby
            both_lanes = REALTIME_QUEUE in consumed and BULK_QUEUE in consumed
            # A single thread has none to spare: its chunk hands back between images instead.
            if both_lanes and standby and scorer.concurrency - standby >= 1:
                _bulk_slots = BulkSlots(scorer.concurrency - standby)
            _bulk_slots_built = True
        return _bulk_slots


@contextmanager
def _bulk_slot(scorer: Scorer) -> Iterator[tuple[bool, BulkSlots | None]]:
    """Hold one of the worker's bulk slots for a chunk; (False, …) when the chunk should be given back
    unclaimed instead, because realtime work waits or the worker stops."""
    slots = _standby_slots(scorer)
    if slots is None:
        yield True, None
        return
    realtime_waits = _realtime_probe()
    assert realtime_waits is not None  # slots exist only where realtime is consumed
    if not slots.acquire(lambda: _stopping() or realtime_waits() > 0, realtime_waits.interval_s):
        yield False, slots
        return
    try:
        yield True, slots
    finally:
        slots.release()


@app.task(name=SCORE_CHUNK_TASK, bind=True, max_retries=None)
def score_chunk(self: Task, image_ids: list[str]) -> str:
    """Score a bulk chunk; its transient failures come back later as a chunk of their own."""
    scorer = get_scorer()
    ids: list[uuid.UUID] = []
    for text in image_ids:
        try:
            ids.append(uuid.UUID(str(text)))
        except ValueError:
            log.warning("chunk message names %r, not an image id; skipped", text)
    with _bulk_slot(scorer) as (granted, slots):
        if not granted:
            # Never claimed: the rows are still queued, and the message goes to the back of the lane.
            publish_quietly(app, ids, "bulk", chunk=len(ids))
            log.debug("chunk of %d images given back unclaimed for realtime work", len(ids))
            return "given back"
        return _score_chunk(self, scorer, ids, _chunk_should_yield(slots))


def _score_chunk(task: Task, scorer: Scorer, ids: list[uuid.UUID], should_yield: Callable[[], bool]) -> str:
    settings = scorer.settings
    try:
        report = scorer.process_chunk(ids, should_yield=should_yield)
    except TransientError as exc:
        delay = backoff_delay(task.request.retries + 1, base_s=settings.retry_backoff_s, cap_s=settings.retry_backoff_max_s)
        log.info("chunk of %d images: %s (%s); retrying in %.1fs", len(ids), exc.code, exc.message, delay)
        metrics.IMAGES_RETRIED.labels(exc.code).inc(len(ids))
        raise task.retry(exc=exc, countdown=delay) from exc
    except Exception:
        # As for score_image: the rows stay claimed, and the sweeper brings them back.
        log.exception("chunk of %d images: unexpected error; the sweeper will bring them back", len(ids))
        metrics.IMAGES_RETRIED.labels(errors.INTERNAL_ERROR).inc(len(ids))
        return "error"
    if report.handed_back:
        # Not begun: back to the bulk queue now, behind the backlog, while this thread takes realtime
        # work (or the worker stops).
        publish_quietly(app, report.handed_back, "bulk", chunk=len(report.handed_back))
    if report.retry:
        attempts = max(attempts for _, attempts, _ in report.retry)
        delay = backoff_delay(max(1, attempts), base_s=settings.retry_backoff_s, cap_s=settings.retry_backoff_max_s)
        for _, _, code in report.retry:
            metrics.IMAGES_RETRIED.labels(code).inc()
        log.info("%d images of a chunk retry in %.1fs", len(report.retry), delay)
        publish_quietly(
            app, [image_id for image_id, _, _ in report.retry], "bulk", chunk=len(report.retry), countdown=delay
        )
    return str(report)


@app.task(name=DELIVER_TASK, ignore_result=True)
def deliver_webhook(delivery_id: str, attempt: int) -> str:
    """Attempt one webhook delivery; a short retry is scheduled here, a long one by the sweeper."""
    scorer = get_scorer()
    settings = scorer.settings
    return send_delivery(
        scorer.sessions,
        uuid.UUID(delivery_id),
        attempt,
        policy=URLPolicy.from_settings(settings),
        # Webhook secrets are stored sealed under SYNTHGUARD_SECRET_KEY; building the box is cheap.
        box=SecretBox.from_settings(settings),
        timeout_s=settings.webhook_timeout_s,
        lease_s=settings.stale_after_s,
        retry_schedule=settings.webhook_retry_schedule_s,
        publish_retry=lambda ident, number, delay: publish_deliveries(app, [(ident, number)], countdown=delay),
    )


@app.task(name=BANK_CROPS_TASK, bind=True, max_retries=None)
def bank_crops(self: Task, review_id: str) -> str:
    """Bank the hashes of a reviewed image's crops (worker.cropbank); an outage retries with backoff."""
    from . import cropbank

    scorer = get_scorer()
    settings = scorer.settings
    ident = uuid.UUID(review_id)
    try:
        return cropbank.bank_crops(scorer.sessions, scorer.storage, ident, settings)
    except TransientError as exc:
        attempt = self.request.retries + 1
        if attempt >= settings.max_attempts:
            why = f"{exc.message} (gave up after {attempt} attempts)"
            return cropbank.give_up(scorer.sessions, ident, exc.code, why)
        delay = backoff_delay(attempt, base_s=settings.retry_backoff_s, cap_s=settings.retry_backoff_max_s)
        log.info("review %s: crops not banked yet: %s (%s); retrying in %.1fs", review_id, exc.code, exc.message, delay)
        raise self.retry(exc=exc, countdown=delay) from exc
    except Exception:
        # The database refused, or a bug: the review stays pending and the sweeper asks again.
        log.exception("review %s: unexpected error banking the crops of its image", review_id)
        return "error"


@app.task(name=SWEEP_TASK)
def sweep(stale_after_s: float | None = None) -> int:
    """Re-publish images a lost message or a dead worker left behind, send due webhooks, and ask
    again for the crops of reviews left pending."""
    scorer = get_scorer()
    stale = scorer.settings.stale_after_s if stale_after_s is None else stale_after_s
    images = sweep_stale(
        scorer.sessions,
        app,
        stale_after_s=stale,
        realtime_burst=scorer.settings.realtime_burst,
        bulk_chunk=scorer.settings.bulk_chunk,
    )
    with scorer.sessions.begin() as session:
        due_now = due(session, lease_s=stale)
    if due_now:
        publish_deliveries(app, due_now)
    return images + len(due_now) + sweep_crops(scorer.sessions, app, stale_after_s=stale)


@inspect_command()
def synthguard_model(state: object) -> dict[str, object]:
    """Remote control: the model this worker process holds (``synthguard models`` asks every worker)."""
    scorer = _scorer
    if scorer is None:
        return {"loaded": False}
    detector = scorer.detector
    return {
        "loaded": True,
        "name": detector.name,
        "version": detector.version,
        "untrained": detector.untrained,
        "device": str(detector.device),
        "precision": detector.precision,
        "frozen": detector.frozen,
        "source": detector.source,
        "ai_index": detector.ai_index,
        "batch_size": scorer.settings.batch_size,
        "bulk_chunk": scorer.settings.bulk_chunk,
        "concurrency": scorer.concurrency,
        "prepare_processes": scorer.preparer.processes,
    }
