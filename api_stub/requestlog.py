"""What every HTTP request leaves behind: its metrics, one access line, and its ids on every log line.

Pure ASGI, so the ids bound here are in the context of the endpoint (and of
the threads sync endpoints run in) without copying. Only the method, the
route template, the ids in the path, the status and the duration are logged:
never headers (``Authorization`` carries the API key), bodies or query strings.
Routes are matched here, before the app runs, so that a request the body
limit refuses still counts under its route.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker import logs

from .metrics import REQUEST_DURATION, REQUESTS

REQUEST_ID_HEADER = "x-request-id"
# A caller's request id is kept only when it is short and plain: it goes into every line.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Path parameters worth a field of their own (the names the routes use).
_ID_PARAMS = ("scan_id", "image_id", "delivery_id")

# Paths that match no route share one label: raw paths would grow the metric series without bound.
UNMATCHED = "unmatched"

access_log = logging.getLogger("synthguard.access")


def match_route(scope: Scope, routes: Sequence[BaseRoute]) -> tuple[str, dict[str, object]]:
    """The template of the route ``scope`` goes to (``/v1/scans/{scan_id}``) and its path parameters."""
    partial = None
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", UNMATCHED)), dict(child.get("path_params", {}))
        if match is Match.PARTIAL and partial is None:  # right path, wrong method: a 405
            partial = str(getattr(route, "path", UNMATCHED))
    return partial or UNMATCHED, {}


class RequestObserver:
    """Binds a request id (the caller's ``X-Request-ID`` or a new one), then counts, times and logs the request."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.routes = list(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = given if _SAFE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        route, params = match_route(scope, self.routes)
        ids = {name: params[name] for name in _ID_PARAMS if name in params}
        status = 500  # what the server answers when the app raises before responding
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        with logs.bound(request_id=request_id, **ids):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                elapsed = time.perf_counter() - started
                REQUEST_DURATION.labels(scope["method"], route).observe(elapsed)
                REQUESTS.labels(scope["method"], route, str(status)).inc()
                duration_ms = round(elapsed * 1000, 2)
                access_log.info(
                    "%s %s %d %.1fms",
                    scope["method"],
                    route,
                    status,
                    duration_ms,
                    extra={
                        "fields": {
                            "method": scope["method"],
                            "route": route,
                            "status": status,
                            "duration_ms": duration_ms,
                        }
                    },
                )
