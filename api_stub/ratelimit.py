"""Rate limits: fixed one-minute windows counted in Redis, shared by every API process.

Four counters, each off at 0:

* requests per client (``SYNTHGUARD_API_RATE_LIMIT_PER_MINUTE``);
* images per client (``SYNTHGUARD_API_IMAGE_RATE_LIMIT_PER_MINUTE``, or the
  client's own ``images_per_minute``): a request for 1,000 objects counts 1,000;
* requests per network address, before the API key is looked up or the body
  read (``SYNTHGUARD_API_ADDRESS_RATE_LIMIT_PER_MINUTE``, :class:`AddressGuard`);
* failed authentications per address (``SYNTHGUARD_API_AUTH_FAILURES_PER_MINUTE``):
  past it, the address is refused before any database query until the window ends.

The counters live in ``SYNTHGUARD_RATE_LIMIT_REDIS_URL``'s Redis, else in the
broker's; with a broker that is not Redis and no Redis of their own, they are off.
When Redis cannot be reached the limiter fails closed (503) unless
``SYNTHGUARD_API_RATE_LIMIT_FAIL_OPEN`` is set: a limit that silently
disappears in an outage is no limit against a client that causes one.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from worker.settings import REDIS_SCHEMES

log = logging.getLogger(__name__)

WINDOW_S = 60
KEY_PREFIX = "synthguard:ratelimit:"
# After Redis fails, skip it this long: each request would otherwise wait on a dead socket.
BACKOFF_S = 5.0
_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class Decision:
    """Whether a request may proceed, and when the window resets."""

    allowed: bool
    limit: int
    count: int
    retry_after_s: int
    unavailable: bool = False  # refused because the counters cannot be reached


class RateLimiter:
    """The four per-minute counters; a non-Redis broker turns them all off."""

    def __init__(
        self,
        redis_url: str | None,
        limit: int,
        *,
        images_per_minute: int = 0,
        address_per_minute: int = 0,
        auth_failures_per_minute: int = 0,
        fail_open: bool = False,
    ) -> None:
        self.limit = limit
        self.images_per_minute = images_per_minute
        self.address_per_minute = address_per_minute
        self.auth_failures_per_minute = auth_failures_per_minute
        self.fail_open = fail_open
        self._client: redis.Redis | None = None
        self._skip_until = 0.0
        wanted = max(limit, images_per_minute, address_per_minute, auth_failures_per_minute) > 0
        if wanted and redis_url:
            if redis_url.startswith(REDIS_SCHEMES):
                self._client = redis.Redis.from_url(
                    redis_url, socket_connect_timeout=_TIMEOUT_S, socket_timeout=_TIMEOUT_S
                )
            else:
                log.warning(
                    "rate limiting is off: the broker is not Redis and SYNTHGUARD_RATE_LIMIT_REDIS_URL is unset"
                )

    @property
    def enabled(self) -> bool:
        return self._client is not None

    # ----------------------------------------------------------------- counters

    def hit(self, client_id: uuid.UUID) -> Decision:
        """Count one request of ``client_id``."""
        return self._count(f"client:{client_id}", 1, self.limit)

    def hit_images(self, client_id: uuid.UUID, count: int, limit: int | None = None) -> Decision:
        """Count ``count`` images of ``client_id`` against ``limit`` (default: the server's).

        A refused request takes its images back out of the window: a client
        over its limit is not pushed further over by its own retries.
        """
        limit = self.images_per_minute if limit is None else limit
        return self._count(f"images:{client_id}", count, limit, refund=True)

    def hit_address(self, address: str) -> Decision:
        """Count one request from ``address``; refused too while its failed authentications are over the limit."""
        failures = self._peek(f"authfail:{address}", self.auth_failures_per_minute)
        if not failures.allowed:
            return failures
        return self._count(f"addr:{address}", 1, self.address_per_minute)

    def auth_failed(self, address: str) -> None:
        """Count one failed authentication from ``address``."""
        self._count(f"authfail:{address}", 1, self.auth_failures_per_minute)

    # ----------------------------------------------------------------- internals

    def _window(self) -> tuple[int, int]:
        now = time.time()
        window = int(now // WINDOW_S)
        return window, max(1, math.ceil((window + 1) * WINDOW_S - now))

    def _unreachable(self, limit: int, retry_after: int) -> Decision:
        return Decision(self.fail_open, limit, 0, retry_after, unavailable=not self.fail_open)

    def _count(self, name: str, amount: int, limit: int, *, refund: bool = False) -> Decision:
        window, retry_after = self._window()
        if limit <= 0 or self._client is None:
            return Decision(True, limit, 0, retry_after)
        if time.monotonic() < self._skip_until:
            return self._unreachable(limit, retry_after)
        key = f"{KEY_PREFIX}{name}:{window}"
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.incrby(key, amount)
            # Two windows: the key outlives clock skew between API hosts, then disappears.
            pipe.expire(key, 2 * WINDOW_S)
            count = int(pipe.execute()[0])
            if count > limit and refund:
                self._client.decrby(key, amount)
        except redis.RedisError as exc:
            return self._failed(exc, limit, retry_after)
        return Decision(count <= limit, limit, count, retry_after)

    def _peek(self, name: str, limit: int) -> Decision:
        window, retry_after = self._window()
        if limit <= 0 or self._client is None:
            return Decision(True, limit, 0, retry_after)
        if time.monotonic() < self._skip_until:
            return self._unreachable(limit, retry_after)
        try:
            raw: Any = self._client.get(f"{KEY_PREFIX}{name}:{window}")
        except redis.RedisError as exc:
            return self._failed(exc, limit, retry_after)
        count = int(raw or 0)
        return Decision(count < limit, limit, count, retry_after)

    def _failed(self, exc: Exception, limit: int, retry_after: int) -> Decision:
        self._skip_until = time.monotonic() + BACKOFF_S
        outcome = "letting requests through" if self.fail_open else "refusing requests with 503"
        log.warning("rate limiter cannot reach Redis (%s); %s", type(exc).__name__, outcome)
        return self._unreachable(limit, retry_after)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class AddressGuard:
    """ASGI middleware: the per-address limits on ``/v1``, before authentication and the body."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith("/v1/") or not self.limiter.enabled:
            await self.app(scope, receive, send)
            return
        decision = await run_in_threadpool(self.limiter.hit_address, client_address(scope))
        if decision.allowed:
            await self.app(scope, receive, send)
            return
        # Imported here: problems imports the schemas, which this low-level module does not need otherwise.
        from fastapi.responses import JSONResponse

        from .problems import PROBLEM_MEDIA_TYPE, problem_body

        path = str(scope.get("path", ""))
        if decision.unavailable:
            status, retry_after = 503, int(BACKOFF_S)
            body = problem_body(
                status,
                "The rate limiter cannot reach its Redis; retry later.",
                slug="rate-limiter-unavailable",
                instance=path,
            )
        else:
            status, retry_after = 429, decision.retry_after_s
            body = problem_body(
                status,
                "Too many requests, or too many failed authentications, from this address this minute; "
                f"retry in {retry_after} s.",
                slug="address-rate-limited",
                instance=path,
            )
        response = JSONResponse(
            body, status_code=status, headers={"Retry-After": str(retry_after)}, media_type=PROBLEM_MEDIA_TYPE
        )
        await response(scope, receive, send)
