"""Prometheus metrics of the API (recorded per request by ``requestlog.RequestObserver``).

Metrics are defined once, at import: ``create_app`` may run many times in one
process (tests), and a second registration of the same name would fail.
Under ``uvicorn --workers N`` set ``PROMETHEUS_MULTIPROC_DIR`` so that
``/metrics`` adds up every worker process instead of showing one at random.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

REQUESTS = Counter(
    "synthguard_api_requests_total",
    "HTTP requests answered, by method, route template and status code.",
    ["method", "route", "status"],
)
REQUEST_DURATION = Histogram(
    "synthguard_api_request_duration_seconds",
    "Time to answer an HTTP request, by method and route template.",
    ["method", "route"],
)
SCANS_CREATED = Counter(
    "synthguard_scans_created_total",
    "Scans created through the API (idempotent replays not counted), by priority.",
    ["priority"],
)
IMAGES_ENQUEUED = Counter(
    "synthguard_images_enqueued_total",
    "Images queued through the API (duplicates and replays not counted), by priority.",
    ["priority"],
)


def render() -> tuple[bytes, str]:
    """The text exposition of every metric, and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
