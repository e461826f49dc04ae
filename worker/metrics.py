"""Prometheus metrics of a queue worker, and the HTTP server that exposes them.

Each ``synthguard worker`` process serves its own ``/metrics`` on
``SYNTHGUARD_METRICS_PORT``: one worker per GPU means one port per process,
and Prometheus adds the processes up. The API has its own metrics
(``api_stub/metrics.py``); this module is imported only where the worker
does the work, so that the API's ``/metrics`` does not carry empty worker series.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis import Redis, RedisError

if TYPE_CHECKING:
    from .batching import BatchStats
    from .detector import Detector
    from .preparing import Preparer
    from .settings import Settings

log = logging.getLogger(__name__)

IMAGES_SCORED = Counter(
    "synthguard_images_scored_total",
    "Images this worker scored and stored as done, by verdict (flagged=unknown: an untrained model gave no verdict).",
    ["flagged"],
)
IMAGES_CACHED = Counter(
    "synthguard_images_cached_total",
    "Images stored with the result of identical bytes the same client already had scored (cached_from).",
)
KNOWN_MATCHES = Counter(
    "synthguard_known_matches_total",
    "Images that matched a hash in their client's bank of known AI images (known_match).",
)
BANK_CROPS = Counter(
    "synthguard_bank_crops_total",
    "Reviews `ai` whose crops' hashes a worker banked (banked), found decided by a later review "
    "(superseded), or could not bank (the error code).",
    ["state"],
)
IMAGES_FAILED = Counter(
    "synthguard_images_failed_total",
    "Images this worker failed for good, by error code.",
    ["code"],
)
IMAGES_RETRIED = Counter(
    "synthguard_images_retried_total",
    "Scoring attempts handed back to the broker for a later retry, by error code.",
    ["code"],
)
BATCH_SIZE = Histogram(
    "synthguard_batch_size",
    "Images in one forward pass of the micro-batcher.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
BATCH_FILL = Histogram(
    "synthguard_batch_fill_seconds",
    "Time from the first image of a batch arriving to its forward pass starting.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
STAGE_SECONDS = Histogram(
    "synthguard_stage_seconds",
    "Time one image spent in a scoring stage (forward: once per batch).",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
DEVICE_DECODE_REFUSED = Counter(
    "synthguard_device_decode_refused_total",
    "JPEGs that passed the CPU's checks but that the model's device could not decode "
    "(SYNTHGUARD_DEVICE_DECODE); each went through the CPU path instead.",
)
PREPARE_PROCESSES_LOST = Counter(
    "synthguard_prepare_processes_lost_total",
    "Preparing processes (SYNTHGUARD_PREPARE_PROCESSES) that died or were killed while working on an "
    "image, by reason: crashed (the image fails as corrupt_image), timeout (killed; decode_timeout), "
    "memory (the image's bytes did not fit under its memory cap; too_large) or died (killed from outside; "
    "the image retries). Each is replaced.",
    ["reason"],
)
PREPARE_PROCESSES = Gauge(
    "synthguard_prepare_processes",
    "This worker's preparing processes, by state: busy (working on an image) or idle. All busy while "
    "images wait for one means the CPU stages are the limit. Absent with SYNTHGUARD_PREPARE_PROCESSES=0.",
    ["state"],
)
WEBHOOK_ATTEMPTS = Counter(
    "synthguard_webhook_attempts_total",
    "Webhook delivery attempts, by outcome (delivered, retrying, failed, skipped).",
    ["outcome"],
)
# Info appends "_info": the series is synthguard_model_info{name,version,device} 1.
MODEL = Info("synthguard_model", "The detector this worker process has loaded.")

STAGES = ("fetch", "decode", "provenance", "hash", "preprocess", "queue_wait", "forward", "match", "store")

# Scrapes must stay fast when the broker is slow or gone.
BROKER_TIMEOUT_S = 0.5


def observe_batch(stats: BatchStats) -> None:
    """The micro-batcher's ``on_batch`` hook: one call per forward pass."""
    BATCH_SIZE.observe(stats.size)
    BATCH_FILL.observe(stats.fill_s)
    STAGE_SECONDS.labels("forward").observe(stats.run_s)


def stamp_start(forward: Callable[[list[Any]], Sequence[Any]]) -> Callable[[list[Any]], list[tuple[Any, float]]]:
    """Wrap a batch function so that each result carries the ``time.monotonic()`` its call began.

    The batcher's ``BatchStats`` times a batch; an image's own wait from submit
    to its forward pass is known only to the thread that submitted it.
    """

    def stamped(items: list[Any]) -> list[tuple[Any, float]]:
        started = time.monotonic()
        return [(result, started) for result in forward(items)]

    return stamped


def webhook_attempt(outcome: str) -> str:
    """Count one webhook attempt and hand its outcome back, so a ``return`` can wrap it."""
    WEBHOOK_ATTEMPTS.labels(outcome).inc()
    return outcome


def set_model(detector: Detector) -> None:
    """Record which checkpoint this process scores with."""
    MODEL.info({"name": str(detector.name), "version": str(detector.version), "device": str(detector.device)})


def watch_preparer(preparer: Preparer) -> None:
    """Export how many of ``preparer``'s children are busy, read on each scrape."""
    from .preparing import ProcessPreparer

    if not isinstance(preparer, ProcessPreparer):
        return
    PREPARE_PROCESSES.labels("busy").set_function(lambda: preparer.busy)
    PREPARE_PROCESSES.labels("idle").set_function(lambda: preparer.processes - preparer.busy)


class QueueDepthCollector(Collector):
    """``synthguard_queue_depth{queue}``, asked of the broker on each scrape.

    Only Redis brokers are asked (``LLEN`` of the queue's list); any other
    broker, or a Redis that does not answer within ``BROKER_TIMEOUT_S``,
    yields no series rather than failing the scrape.
    """

    def __init__(self, broker_url: str, queues: Sequence[str]) -> None:
        self.queues = tuple(queues)
        self._client: Redis | None = None
        if broker_url.startswith(("redis://", "rediss://")):
            self._client = Redis.from_url(
                broker_url, socket_timeout=BROKER_TIMEOUT_S, socket_connect_timeout=BROKER_TIMEOUT_S
            )

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Describing without samples keeps registration from calling the broker.
        return [self._family()]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if self._client is None:
            return []
        try:
            pipe = self._client.pipeline(transaction=False)
            for name in self.queues:
                pipe.llen(name)
            depths = pipe.execute()
        except (RedisError, OSError) as exc:  # the broker's trouble must not break the rest of the scrape
            log.debug("queue depth unavailable: %s", exc)
            return []
        family = self._family()
        for name, depth in zip(self.queues, depths, strict=True):
            family.add_metric([name], float(depth))
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "synthguard_queue_depth", "Messages waiting in a broker queue (Redis brokers only).", labels=["queue"]
        )


_started_lock = threading.Lock()
_started = False


def start_metrics_server(settings: Settings, queues: Sequence[str]) -> bool:
    """Serve ``/metrics`` on ``settings.metrics_port`` unless it is unset or 0; once per process.

    Returns whether a server runs now. A port in use raises: two workers on one
    host need two ports, and silently serving nothing would hide that.
    """
    global _started
    port = settings.metrics_port
    if not port:
        return False
    with _started_lock:
        if not _started:
            REGISTRY.register(QueueDepthCollector(settings.broker_url, queues))
            # Every interface: Prometheus scrapes from another host.
            start_http_server(port, addr="0.0.0.0")  # noqa: S104 - scraped from other hosts
            _started = True
            log.info("metrics on port %d at /metrics", port)
    return True
