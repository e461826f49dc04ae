"""Per-client rate limiting: a fixed one-minute window counted in Redis.

The counter lives in the broker's Redis so that every API process (and every
``--workers`` child) shares it. The limiter fails open: an API that refuses
all traffic because a counter is unreachable would turn a Redis hiccup into an
outage, and the broker being down is already reported by ``/readyz``.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass

import redis

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


class RateLimiter:
    """``limit`` requests per client per minute; ``limit == 0`` or a non-Redis broker turns it off."""

    def __init__(self, redis_url: str | None, limit: int) -> None:
        self.limit = limit
        self._client: redis.Redis | None = None
        self._skip_until = 0.0
        if limit > 0 and redis_url:
            if redis_url.startswith(("redis://", "rediss://", "unix://")):
                self._client = redis.Redis.from_url(
                    redis_url, socket_connect_timeout=_TIMEOUT_S, socket_timeout=_TIMEOUT_S
                )
            else:
                log.warning("rate limiting is off: the broker is not Redis")

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def hit(self, client_id: uuid.UUID) -> Decision:
        """Count one request of ``client_id`` in the current window."""
        now = time.time()
        window = int(now // WINDOW_S)
        retry_after = max(1, math.ceil((window + 1) * WINDOW_S - now))
        if self._client is None or time.monotonic() < self._skip_until:
            return Decision(True, self.limit, 0, retry_after)
        key = f"{KEY_PREFIX}{client_id}:{window}"
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.incr(key)
            # Two windows: the key outlives clock skew between API hosts, then disappears.
            pipe.expire(key, 2 * WINDOW_S)
            count = int(pipe.execute()[0])
        except redis.RedisError as exc:
            self._skip_until = time.monotonic() + BACKOFF_S
            log.warning("rate limiter cannot reach Redis (%s); letting requests through", type(exc).__name__)
            return Decision(True, self.limit, 0, retry_after)
        return Decision(count <= self.limit, self.limit, count, retry_after)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
