"""The producer-facing HTTP API: ``create_app`` builds it (``synthguard api`` serves it).

One module per concept: ``auth`` (API keys, rate limit), ``scans`` and
``events`` (the endpoints producers call), ``webhooks`` (deliveries, endpoints,
signing secrets), ``operations`` (health, readiness, metrics), ``problems``
(every error as RFC 9457 problem details), ``schemas`` (a package: bodies and
their documentation, by concept), ``bodylimit`` and ``requestlog`` (middleware: body cap;
metrics, access log and request ids), ``metrics`` (the API's Prometheus metrics).
The API never migrates the database: operators run ``synthguard db upgrade``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from celery import Celery
from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.routing import BaseRoute, Route

from worker import __version__, logs
from worker.celery_app import create_app as create_celery_app
from worker.db import get_sessionmaker
from worker.settings import Settings, get_settings

from . import events, operations, reviews, scans, webhooks
from .bodylimit import BodyLimitMiddleware
from .problems import PROBLEM_MEDIA_TYPE, install_problem_handlers
from .ratelimit import AddressGuard, RateLimiter
from .requestlog import RequestObserver
from .schemas import MAX_EVENT_RECORDS, MAX_METADATA_BYTES, MAX_OBJECTS
from .state import ApiState

TITLE = "synthguard API"
DESCRIPTION = f"""
Tells whether images in S3 were AI-generated. Submit object keys; workers fetch,
decode and score them with the "For Fake's Sake" detector; read results here or
receive signed webhooks.

**Authentication**: every `/v1` endpoint needs `Authorization: Bearer <api key>`
(create one with `synthguard clients create NAME --bucket BUCKET[/PREFIX]`). Each
client sees only its own scans and images; anything else answers 404.

**Grants**: a client may queue only objects in the buckets, or bucket folders, an
operator granted it (`synthguard clients grant`); any other object makes the whole
request 403 (`not-granted`, naming the bucket) before anything is queued. A grant
revoked later fails the client's queued images there with `access_denied`,
without fetching them. A client may also be limited to some lanes (403
`lane-not-allowed`) and to some callback hosts (422).

**Flow**: `POST /v1/scans` (or `POST /v1/s3-events` from a bucket notification)
answers 202 with a scan id and one image id per object; poll
`GET /v1/scans/{{id}}` or `GET /v1/images/{{id}}` until images are `done` (with a
score, p(synthetic) from 0 to 1, and `flagged` at or over the threshold) or
`failed` (with an `error_code`).

**Limits**: {MAX_OBJECTS} objects per scan, {MAX_EVENT_RECORDS} records per
notification, {MAX_METADATA_BYTES} bytes of metadata, a capped request body
(413); per client, requests and images per minute, and a cap on images queued
and not yet done per lane (429 `rate-limited` or `quota-exceeded`, with
`Retry-After`); per network address, requests and failed authentications per
minute (429 `address-rate-limited`, before the key is checked). When the limits'
Redis is unreachable, `/v1` answers 503 rather than run unlimited.

**Errors** are RFC 9457 problem details (`application/problem+json`): `type`,
`title`, `status`, `detail`, `instance`, and for 422 an `errors` list naming
each invalid field.
""".strip()

TAGS = [
    {"name": "scans", "description": "Submit S3 objects for scoring and read the results."},
    {"name": "images", "description": "Read one image's result."},
    {"name": "events", "description": "Receive S3 event notifications (upload hooks)."},
    {"name": "webhooks", "description": "Signed notifications: deliveries, replays, secret rotation."},
    {"name": "operations", "description": "Liveness, readiness and metrics; no API key needed."},
]


def create_app(settings: Settings | None = None, *, celery: Celery | None = None) -> FastAPI:
    """Build the API for ``settings`` (default: the environment), publishing through ``celery``."""
    owns_celery = False
    if settings is None:
        settings = get_settings()
        if settings.log_format is not None and not logs.is_configured():
            # A server process uvicorn started itself (--workers > 1): nobody configured it.
            logs.configure_logging(
                settings.log_format, logging.INFO, log_object_keys=settings.log_object_keys
            )
        if celery is None:
            # The process-wide app is built from the same environment: share its broker pool.
            from worker.celery_app import app as celery
    if celery is None:
        celery, owns_celery = create_celery_app(settings), True
    state = ApiState(
        settings=settings,
        sessions=get_sessionmaker(settings.database_url),
        celery=celery,
        rate_limiter=RateLimiter(
            settings.rate_limit_url,
            settings.api_rate_limit_per_minute,
            images_per_minute=settings.api_image_rate_limit_per_minute,
            address_per_minute=settings.api_address_rate_limit_per_minute,
            auth_failures_per_minute=settings.api_auth_failures_per_minute,
            fail_open=settings.api_rate_limit_fail_open,
        ),
        owns_celery=owns_celery,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.rate_limiter.close()
        if state.owns_celery:
            state.celery.close()

    app = FastAPI(
        title=TITLE,
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.state.api = state
    install_problem_handlers(app)
    app.include_router(scans.router)
    app.include_router(reviews.router)
    app.include_router(events.router)
    app.include_router(webhooks.router)
    app.include_router(operations.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.api_max_body_bytes)
    # Outside the body limit: an address over its limits is refused before its body is read.
    app.add_middleware(AddressGuard, limiter=state.rate_limiter)
    # Added last is outermost: requests the body limit refuses are counted and logged too.
    app.add_middleware(
        RequestObserver,
        routes=_plain_routes(app, scans.router, events.router, webhooks.router, operations.router),
    )
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _plain_routes(app: FastAPI, *routers: APIRouter) -> list[BaseRoute]:
    """Every endpoint as a route that matches a request on its own (for metric labels)."""
    own = [route for route in app.router.routes if isinstance(route, Route)]  # /openapi.json, /docs
    return own + [route for router in routers for route in router.routes]


_AUTO_422 = "#/components/schemas/HTTPValidationError"


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with error bodies declared as ``application/problem+json``."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.get("responses", {})
                # FastAPI's own 422 entry describes its default body, which this API never sends;
                # every route that can answer 422 declares its own.
                if _AUTO_422 in str(responses.get("422", "")):
                    del responses["422"]
                for code, response in responses.items():
                    content = response.get("content", {})
                    if code[:1] in "45" and "application/json" in content:
                        content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")
        for unused in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema
