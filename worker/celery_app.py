"""Builds the Celery app; nothing else lives here.

Choices, and why:

* Thread pool, one process per GPU: one model in memory, many threads each
  fetching and decoding one image and waiting on the in-process micro-batcher.
  Celery keeps its per-task acks, retries and late acknowledgement, which a
  batch-consuming task (celery-batches) would give up.
* ``task_acks_late``: a message is acknowledged only after its image is
  terminal, so a killed worker's messages come back. The database is still the
  source of truth: the sweeper re-publishes what a broker loses.
* ``queue_order_strategy="priority"`` and ``prefetch_multiplier=1``: the worker
  polls ``realtime`` before ``webhooks`` before ``overflow`` before ``bulk``
  whenever a thread frees up, and holds no more messages than it has threads,
  so a bulk backlog of any size delays a realtime image by at most the work
  already in flight. A bulk message carries a chunk of images; a thread that
  holds one hands the rest back to the bulk queue when realtime messages wait
  (worker.tasks.score_chunk), so a free thread is never more than one image away.
* ``overflow`` holds a client's realtime images past its burst
  (``SYNTHGUARD_REALTIME_BURST``, worker.queueing.realtime_share): one client's
  flood waits there, behind every other client's realtime images.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from .settings import Settings, get_settings

REALTIME_QUEUE = "synthguard.realtime"
BULK_QUEUE = "synthguard.bulk"
WEBHOOKS_QUEUE = "synthguard.webhooks"
OVERFLOW_QUEUE = "synthguard.overflow"
# Polling order: first is served first whenever a worker thread is free.
QUEUES = (REALTIME_QUEUE, WEBHOOKS_QUEUE, OVERFLOW_QUEUE, BULK_QUEUE)
LANES = {"realtime": REALTIME_QUEUE, "bulk": BULK_QUEUE}
# Task names: the tasks register under these, producers send to them.
SCORE_TASK = "synthguard.score_image"
SCORE_CHUNK_TASK = "synthguard.score_chunk"  # bulk: up to SYNTHGUARD_BULK_CHUNK ids per message
DELIVER_TASK = "synthguard.deliver_webhook"
SWEEP_TASK = "synthguard.sweep"
BANK_CROPS_TASK = "synthguard.bank_crops"  # after a review `ai`: bank the hashes of the image's crops


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("synthguard", broker=settings.broker_url, include=["worker.tasks"])
    app.conf.update(
        # One direct exchange per queue: a bare Queue(name) would bind every
        # queue to the default queue's exchange and key, copying each message
        # into every lane.
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue=REALTIME_QUEUE,
        task_default_exchange=REALTIME_QUEUE,
        task_default_routing_key=REALTIME_QUEUE,
        task_routes={
            SWEEP_TASK: {"queue": REALTIME_QUEUE},
            # A person waits on it, and there are as many as there are reviews: a few hashes each.
            BANK_CROPS_TASK: {"queue": REALTIME_QUEUE},
            DELIVER_TASK: {"queue": WEBHOOKS_QUEUE},
        },
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "queue_order_strategy": "priority",
            # Unacked messages of a dead worker return after this long; the
            # sweeper usually gets there first (SYNTHGUARD_STALE_AFTER_S).
            "visibility_timeout": max(3600.0, 2 * settings.stale_after_s),
        },
        beat_schedule={
            "synthguard-sweep": {
                "task": SWEEP_TASK,
                "schedule": settings.sweep_interval_s,
                # The scheduler's configuration decides what "stale" means.
                "kwargs": {"stale_after_s": settings.stale_after_s},
            },
        },
    )
    return app


app = create_app()
