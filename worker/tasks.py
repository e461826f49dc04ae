"""Celery tasks: thin. Load by id, call the plain function, decide retry."""

from __future__ import annotations

import logging
import threading
import uuid

from celery import Task
from celery.signals import worker_shutdown

from .celery_app import app
from .errors import TransientError, backoff_delay
from .outbox import due, send_delivery
from .queueing import publish_deliveries, sweep_stale
from .scoring import Scorer
from .settings import get_settings
from .webhooks import URLPolicy

log = logging.getLogger(__name__)

_scorer: Scorer | None = None
_scorer_lock = threading.Lock()


def _publish_new_deliveries(ids: list[uuid.UUID]) -> None:
    publish_deliveries(app, [(delivery_id, 1) for delivery_id in ids])


def install_scorer(scorer: Scorer) -> None:
    """Use ``scorer`` in this process (``synthguard worker`` loads the model before consuming)."""
    global _scorer
    scorer.on_outbox = _publish_new_deliveries
    with _scorer_lock:
        _scorer = scorer


def get_scorer() -> Scorer:
    """The process's one Scorer, built from the environment on first use."""
    global _scorer
    with _scorer_lock:
        if _scorer is None:
            from .detector import Detector

            settings = get_settings()
            _scorer = Scorer(settings, Detector.from_settings(settings), on_outbox=_publish_new_deliveries)
        return _scorer


@worker_shutdown.connect
def _close_scorer(**_: object) -> None:
    # Warm shutdown has already waited for running tasks; this stops the batching thread.
    if _scorer is not None:
        _scorer.close()


@app.task(name="synthguard.score_image", bind=True, max_retries=None)
def score_image(self: Task, image_id: str) -> str:
    """Score one image by id; transient failures come back later with backoff and jitter."""
    scorer = get_scorer()
    try:
        outcome = scorer.process_image(uuid.UUID(image_id))
    except TransientError as exc:
        settings = scorer.settings
        delay = backoff_delay(
            self.request.retries + 1, base_s=settings.retry_backoff_s, cap_s=settings.retry_backoff_max_s
        )
        log.info("image %s: %s (%s); retrying in %.1fs", image_id, exc.code, exc.message, delay)
        raise self.retry(exc=exc, countdown=delay) from exc
    except LookupError:
        log.warning("image %s is not in the database; message dropped", image_id)
        return "missing"
    return outcome.state


@app.task(name="synthguard.deliver_webhook", ignore_result=True)
def deliver_webhook(delivery_id: str, attempt: int) -> str:
    """Attempt one webhook delivery; a short retry is scheduled here, a long one by the sweeper."""
    scorer = get_scorer()
    settings = scorer.settings
    return send_delivery(
        scorer.sessions,
        uuid.UUID(delivery_id),
        attempt,
        policy=URLPolicy.from_settings(settings),
        timeout_s=settings.webhook_timeout_s,
        lease_s=settings.stale_after_s,
        retry_schedule=settings.webhook_retry_schedule_s,
        publish_retry=lambda ident, number, delay: publish_deliveries(app, [(ident, number)], countdown=delay),
    )


@app.task(name="synthguard.sweep")
def sweep(stale_after_s: float | None = None) -> int:
    """Re-publish images a lost message or a dead worker left behind, and send due webhooks."""
    scorer = get_scorer()
    stale = scorer.settings.stale_after_s if stale_after_s is None else stale_after_s
    images = sweep_stale(scorer.sessions, app, stale_after_s=stale)
    with scorer.sessions.begin() as session:
        due_now = due(session, lease_s=stale)
    if due_now:
        publish_deliveries(app, due_now)
    return images + len(due_now)
