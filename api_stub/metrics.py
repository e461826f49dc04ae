"""Prometheus metrics of the API, and the middleware that counts requests.

Metrics are defined once, at import: ``create_app`` may run many times in one
process (tests), and a second registration of the same name would fail.
Under ``uvicorn --workers N`` set ``PROMETHEUS_MULTIPROC_DIR`` so that
``/metrics`` adds up every worker process instead of showing one at random.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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

# Paths that match no route share one label: raw paths would grow the series without bound.
UNMATCHED = "unmatched"


def render() -> tuple[bytes, str]:
    """The text exposition of every metric, and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def route_template(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The template of the route ``scope`` goes to (``/v1/scans/{scan_id}``), not the raw path."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", UNMATCHED))
        if match is Match.PARTIAL and partial is None:  # right path, wrong method: a 405
            partial = str(getattr(route, "path", UNMATCHED))
    return partial or UNMATCHED


class MetricsMiddleware:
    """Counts and times every HTTP request, including those refused before routing.

    ``routes`` are matched here, before the app runs, so that a request the
    body limit refuses still counts under its route.
    """

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.routes = list(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        route = route_template(scope, self.routes)
        status = 500  # what the server answers when the app raises before responding
        started = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            REQUEST_DURATION.labels(method, route).observe(time.perf_counter() - started)
            REQUESTS.labels(method, route, str(status)).inc()
