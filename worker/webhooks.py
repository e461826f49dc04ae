"""Webhook transport and policy: Standard Webhooks signing, bodies, one delivery attempt, retry schedule.

Pure transport: no database. The caller decides what to send and records what
happened; :func:`deliver` makes exactly one attempt and reports it as an
:class:`AttemptResult`, and :func:`next_delay` says when to try again.

Where a delivery may connect is :mod:`worker.netguard`'s to decide:
:func:`deliver` checks the URL with its :class:`~worker.netguard.URLPolicy`,
resolves the host once and connects only to the addresses that passed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import random
import re
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any, Protocol

import httpcore

from . import __version__
from .errors import UnsafeURL
from .models import as_utc
from .netguard import PinnedBackend, Resolver, URLPolicy, resolve_pinned
from .secretbox import SECRET_PREFIX

__all__ = [
    "EVENT_IMAGE_FLAGGED",
    "EVENT_SCAN_COMPLETED",
    "EVENT_TEST",
    "MAX_RESPONSE_BYTES",
    "RETRY_AFTER_CAP_S",
    "RETRY_SCHEDULE_S",
    "AttemptResult",
    "build_body",
    "deliver",
    "next_delay",
    "parse_retry_after",
    "sign",
]


EVENT_IMAGE_FLAGGED = "image.flagged"
EVENT_SCAN_COMPLETED = "scan.completed"
EVENT_TEST = "webhook.test"

USER_AGENT = f"synthguard/{__version__}"
# We only need the status line; a receiver answering with a novel must not cost us memory or time.
MAX_RESPONSE_BYTES = 64 * 1024


# ------------------------------------------------------------ signing and bodies


def _secret_key(secret: str) -> bytes:
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        # Tolerate missing padding, as the reference library does; anything else is a bad secret.
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except binascii.Error:
        raise ValueError("webhook secret is not whsec_ followed by base64") from None
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks signature ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``."""
    mac = hmac.new(_secret_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


def _iso_utc(moment: datetime) -> str:
    return as_utc(moment).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _json_default(value: object) -> object:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return _iso_utc(value)
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def build_body(event_type: str, data: dict[str, Any], *, timestamp: datetime) -> bytes:
    """``{"type", "timestamp", "data"}`` as compact JSON with sorted keys.

    Sorted keys make the bytes depend on the content only, so a delivery
    rebuilt from its stored payload signs the same. UUIDs and datetimes become
    strings; NaN is refused (it is not JSON).
    """
    envelope = {"type": event_type, "timestamp": _iso_utc(timestamp), "data": data}
    text = json.dumps(
        envelope,
        separators=(",", ":"),
        sort_keys=True,
        ensure_ascii=False,
        allow_nan=False,
        default=_json_default,
    )
    return text.encode("utf-8")


# ----------------------------------------------------------------------- delivery


@dataclass(frozen=True)
class AttemptResult:
    """How one delivery attempt went."""

    ok: bool  # a 2xx answer, nothing else
    status: int | None  # HTTP status; None when no response came
    latency_ms: float
    error: str | None = None
    retry_after_s: float | None = None  # the receiver's Retry-After, in seconds from now
    gone: bool = False  # 410: the endpoint asked to be removed
    permanent: bool = False  # retrying cannot help (unsafe URL, 410)
    address: str | None = None  # the IP actually connected to, for the audit trail


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from ``Retry-After`` (delay-seconds or HTTP-date); None if absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,12}", value):
        return float(int(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" and obsolete forms: HTTP dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _describe_connect_error(exc: Exception) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"tls certificate rejected: {cause.verify_message or cause.reason}"
    if isinstance(cause, ssl.SSLError):
        return f"tls error: {cause.reason or cause}"
    return f"connection failed: {exc}"


def _check_msg_id(msg_id: str) -> None:
    # It goes into a header and into the signed string; keep it to visible ASCII.
    if not msg_id or not all(0x21 <= ord(ch) <= 0x7E for ch in msg_id):
        raise ValueError(f"webhook id must be non-empty visible ASCII, got {msg_id!r}")


@lru_cache(maxsize=1)
def _default_ssl_context() -> ssl.SSLContext:
    # certifi's roots, as httpx uses by default; built once, loading them is not free.
    return httpcore.default_ssl_context()


def deliver(
    url: str,
    *,
    msg_id: str,
    body: bytes,
    secrets: Sequence[str],
    policy: URLPolicy,
    timeout_s: float = 10.0,
    now: Callable[[], float] = time.time,
    resolver: Resolver = socket.getaddrinfo,
    ssl_context: ssl.SSLContext | None = None,
) -> AttemptResult:
    """POST ``body`` to ``url`` once, signed with every secret, and say how it went.

    ``msg_id`` is the ``webhook-id`` (the same on every retry); the timestamp
    is fresh per attempt. ``timeout_s`` bounds the whole exchange after DNS
    (connect, TLS, request, response), not each step. Redirects are never
    followed. Network trouble and policy refusals come back as an
    :class:`AttemptResult`; only caller mistakes (no secrets, a malformed
    secret or id) raise ``ValueError``. ``ssl_context`` replaces the default
    trust roots (certifi's); ``resolver`` replaces ``socket.getaddrinfo``.
    """
    if not secrets:
        raise ValueError("at least one webhook secret is needed")
    for secret in secrets:
        _secret_key(secret)  # a bad secret is a bug to hear about now, whatever the network does
    _check_msg_id(msg_id)
    started = time.monotonic()

    def result(*, ok: bool = False, status: int | None = None, **fields: Any) -> AttemptResult:
        return AttemptResult(ok=ok, status=status, latency_ms=(time.monotonic() - started) * 1000.0, **fields)

    try:
        parsed = policy.parse_url(url)
    except UnsafeURL as exc:
        return result(error=f"unsafe url: {exc}", permanent=True)
    host = parsed.raw_host.decode("ascii")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        addresses = resolve_pinned(host, port, policy, resolver=resolver)
        # A host name on another port was let through check_url; its addresses decide now.
        policy.check_port(parsed.scheme, parsed.port, addresses, host=host)
    except UnsafeURL as exc:
        return result(error=f"unsafe url: {exc}", permanent=True)
    except (OSError, UnicodeError) as exc:
        # A name that does not resolve today may tomorrow: not permanent.
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return result(error=f"dns lookup failed for {host}: {detail}")

    timestamp = int(now())
    signed = [sign(secret, msg_id, timestamp, body) for secret in secrets]
    headers = [
        (b"Host", parsed.netloc),
        (b"User-Agent", USER_AGENT.encode("ascii")),
        (b"Content-Type", b"application/json"),
        (b"Content-Length", str(len(body)).encode("ascii")),
        (b"webhook-id", msg_id.encode("ascii")),
        (b"webhook-timestamp", str(timestamp).encode("ascii")),
        # Several signatures while a secret rotates: the receiver accepts any one it knows.
        (b"webhook-signature", " ".join(signed).encode("ascii")),
    ]
    target = httpcore.URL(
        scheme=parsed.raw_scheme, host=parsed.raw_host, port=parsed.port, target=parsed.raw_path
    )
    deadline = started + timeout_s
    backend = PinnedBackend(host, addresses, deadline)
    timeouts = {"connect": timeout_s, "read": timeout_s, "write": timeout_s, "pool": timeout_s}

    def where() -> str | None:
        return None if backend.connected is None else str(backend.connected)

    try:
        with (
            httpcore.ConnectionPool(
                ssl_context=ssl_context or _default_ssl_context(),
                network_backend=backend,
                max_connections=1,
                retries=0,
            ) as pool,
            pool.stream(
                "POST", target, headers=headers, content=body, extensions={"timeout": timeouts}
            ) as response,
        ):
            status = response.status
            response_headers = response.headers
            _discard_body(response)
    except httpcore.TimeoutException:
        return result(error="timeout", address=where())
    except httpcore.ConnectError as exc:
        return result(error=_describe_connect_error(exc), address=where())
    except (httpcore.NetworkError, httpcore.ProtocolError, OSError) as exc:
        return result(error=f"connection lost: {exc or type(exc).__name__}", address=where())

    retry_after = parse_retry_after(_header(response_headers, b"retry-after"), now=now())
    common: dict[str, Any] = {"status": status, "retry_after_s": retry_after, "address": where()}
    if 200 <= status < 300:
        return result(ok=True, **common)
    if 300 <= status < 400:
        location = _header(response_headers, b"location")
        to = f"to {location[:300]}" if location else "without a Location"
        return result(error=f"redirect not followed ({status} {to})", **common)
    if status == 410:
        return result(
            error="HTTP 410 (gone: the endpoint asked to be removed)", gone=True, permanent=True, **common
        )
    return result(error=f"HTTP {status}", **common)


def _discard_body(response: httpcore.Response) -> None:
    # The status decides the attempt; trouble while reading the rest must not turn
    # a 2xx into a failure (that would deliver twice).
    received = 0
    try:
        for chunk in response.iter_stream():
            received += len(chunk)
            if received >= MAX_RESPONSE_BYTES:
                break
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, OSError):
        pass


# -------------------------------------------------------------------- retry policy

# Delays after attempt 1, 2, ... 10: quick retries for a blip, then hours apart for
# an outage; they add up to about 23.7 hours, so an endpoint down for most of a day
# still gets its events. 11 attempts in all.
RETRY_SCHEDULE_S: tuple[float, ...] = (
    5.0,
    30.0,
    2 * 60.0,
    10 * 60.0,
    30 * 60.0,
    60 * 60.0,
    2 * 3600.0,
    4 * 3600.0,
    8 * 3600.0,
    8 * 3600.0,
)
MAX_ATTEMPTS = len(RETRY_SCHEDULE_S) + 1
JITTER = 0.2  # +-20% on scheduled delays
RETRY_AFTER_CAP_S = 24 * 3600.0  # a receiver cannot park a delivery for longer than this at once


class _Uniform(Protocol):
    def uniform(self, a: float, b: float, /) -> float: ...


def next_delay(
    attempt: int,
    *,
    retry_after_s: float | None,
    rng: _Uniform = random,
    schedule: Sequence[float] = RETRY_SCHEDULE_S,
) -> float | None:
    """Seconds before attempt ``attempt + 1``, after ``attempt`` attempts (1-based); None: give up.

    ``schedule`` (default :data:`RETRY_SCHEDULE_S`; settings may configure
    another) gives the wait after each failed attempt, with +-20% jitter so
    that deliveries failed by one outage do not return together.
    ``Retry-After`` can only lengthen a wait: it is honoured up to
    :data:`RETRY_AFTER_CAP_S`, plus up to 10% (never past the cap) for the
    same reason.
    """
    if attempt < 1:
        raise ValueError("attempt is 1-based: the number of attempts made so far")
    if attempt > len(schedule):
        return None
    scheduled = schedule[attempt - 1] * rng.uniform(1.0 - JITTER, 1.0 + JITTER)
    if retry_after_s is None or not math.isfinite(retry_after_s) or retry_after_s <= 0:
        return scheduled
    asked = min(retry_after_s, RETRY_AFTER_CAP_S)
    return max(scheduled, min(asked * rng.uniform(1.0, 1.1), RETRY_AFTER_CAP_S))
