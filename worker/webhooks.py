"""Webhook transport and policy: Standard Webhooks signing, SSRF-safe delivery, retry schedule.

Pure transport: no database. The caller decides what to send and records what
happened; :func:`deliver` makes exactly one attempt and reports it as an
:class:`AttemptResult`, and :func:`next_delay` says when to try again.

SSRF defence in :func:`deliver`: the host is resolved once, here; every address
it resolves to must pass :meth:`URLPolicy.check_address`; the connection then
goes to those checked addresses only (an httpcore network backend that ignores
DNS), while the URL keeps its host name, so the ``Host`` header, TLS SNI and
certificate verification all use the name. A second lookup by the HTTP stack,
the gap DNS rebinding exploits, never happens.

Ports: a callback URL uses its scheme's port (443 for https, 80 for http)
unless the receiver is inside ``allowed_networks``. An IP literal is judged by
:meth:`URLPolicy.check_url`; a host name on another port is refused there when
no network is allowed, and otherwise judged at send time by
:meth:`URLPolicy.check_port` on the pinned addresses.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import math
import random
import re
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import httpcore
import httpx

from . import __version__
from .errors import UnsafeURL
from .models import as_utc
from .secretbox import SECRET_PREFIX

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "EVENT_IMAGE_FLAGGED",
    "EVENT_SCAN_COMPLETED",
    "EVENT_TEST",
    "MAX_RESPONSE_BYTES",
    "RETRY_AFTER_CAP_S",
    "RETRY_SCHEDULE_S",
    "AttemptResult",
    "URLPolicy",
    "UnsafeURL",
    "build_body",
    "deliver",
    "next_delay",
    "parse_retry_after",
    "resolve_pinned",
    "sign",
]

EVENT_IMAGE_FLAGGED = "image.flagged"
EVENT_SCAN_COMPLETED = "scan.completed"
EVENT_TEST = "webhook.test"

USER_AGENT = f"synthguard/{__version__}"
# We only need the status line; a receiver answering with a novel must not cost us memory or time.
MAX_RESPONSE_BYTES = 64 * 1024
# Bounds the DNS name of a callback host (RFC 1035), so nothing odd reaches the resolver.
_HOSTNAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*\.?")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# socket.getaddrinfo's shape; tests pass their own to script DNS answers.
Resolver = Callable[..., Sequence[tuple[Any, ...]]]


# ------------------------------------------------------------------ address policy


def _table(*rows: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(net), label) for net, label in rows)


# First match wins, so narrower networks come before the ranges that contain them.
# ``ipaddress`` properties back this up (see _blocked_reason), but they differ
# between Python patch releases and miss some ranges (224/4 counts as global in
# 3.11), so the ranges that matter are spelled out.
_BLOCKED_V4 = _table(
    ("0.0.0.0/8", "unspecified / this network"),
    ("10.0.0.0/8", "private"),
    # Alibaba Cloud's instance metadata; inside CGNAT too, but named for what it is.
    ("100.100.100.200/32", "Alibaba Cloud instance metadata"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    # Azure's WireServer: a public-looking address every Azure VM reaches (agent, health, DNS).
    ("168.63.129.16/32", "Azure WireServer (platform metadata)"),
    ("169.254.0.0/16", "link-local, home of cloud metadata at 169.254.169.254"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
)
_BLOCKED_V6 = _table(
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible (deprecated)"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/32", "Teredo tunnel"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    # AWS's IPv6 instance metadata (IMDS) on Nitro instances; inside fc00::/7 but named first.
    ("fd00:ec2::254/128", "AWS instance metadata (IPv6)"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# The one port each scheme may use outside allowed_networks.
_DEFAULT_PORTS = {"https": 443, "http": 80}


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 one leads to (mapped, NAT64, 6to4), if any.

    Connecting to such an address reaches the IPv4 host (dual-stack socket, a
    NAT64 gateway, a 6to4 relay), so it must pass the IPv4 rules.
    """
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped form", ip.ipv4_mapped
    if ip in _NAT64:
        return "NAT64 form", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return "6to4 form", ip.sixtofour
    return None


def _as_network(value: IPNetwork | str) -> IPNetwork:
    return ipaddress.ip_network(value, strict=False) if isinstance(value, str) else value


@dataclass(frozen=True)
class URLPolicy:
    """Which callback URLs and addresses webhooks may go to.

    ``allowed_networks`` are exempt from the address block (an on-premises
    receiver, tests); everything else must be a public unicast address. Only
    addresses in ``allowed_networks`` may be reached on a port other than the
    scheme's own (443, or 80 for http): a public host name on port 6379 or
    8500 is how a webhook is aimed at some other service.
    """

    allow_http: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()

    def __post_init__(self) -> None:
        # Accept lists and CIDR strings too: settings and tests hand over either.
        object.__setattr__(self, "allowed_networks", tuple(_as_network(n) for n in self.allowed_networks))

    @classmethod
    def from_settings(cls, settings: Settings) -> URLPolicy:
        """The policy of ``SYNTHGUARD_WEBHOOK_ALLOW_HTTP`` and ``..._ALLOWED_NETWORKS``."""
        return cls(
            allow_http=bool(settings.webhook_allow_http),
            allowed_networks=tuple(settings.webhook_allowed_networks),
        )

    def check_url(self, url: str) -> None:
        """Refuse a URL by its text alone: syntax, scheme, credentials, port, IP literal. No DNS."""
        self.parse_url(url)

    def parse_url(self, url: str) -> httpx.URL:
        """:meth:`check_url`, returning the parsed URL that :func:`deliver` then uses as is."""
        if not isinstance(url, str) or not url:
            raise UnsafeURL("empty URL")
        if any(ch.isspace() or not ch.isprintable() for ch in url):
            try:
                netloc = urlsplit(url).netloc
            except ValueError:  # e.g. an unclosed "[" of an IPv6 literal
                netloc = ""
            where = "host" if any(ch.isspace() or not ch.isprintable() for ch in netloc) else "URL"
            raise UnsafeURL(f"{where} contains whitespace or control characters")
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise UnsafeURL(f"malformed URL: {exc}") from None
        if parsed.scheme == "http":
            if not self.allow_http:
                raise UnsafeURL("http:// is not allowed, use https:// (SYNTHGUARD_WEBHOOK_ALLOW_HTTP is off)")
        elif not parsed.scheme:
            raise UnsafeURL("URL has no scheme, use https://")
        elif parsed.scheme != "https":
            raise UnsafeURL(f"scheme {parsed.scheme!r} is not allowed, use https://")
        if parsed.userinfo:
            raise UnsafeURL("credentials in the URL (user:password@) are not allowed")
        host = parsed.raw_host.decode("ascii")
        if not host:
            raise UnsafeURL("URL has no host")
        if parsed.port is not None and not 1 <= parsed.port <= 65535:
            raise UnsafeURL(f"port {parsed.port} is out of range 1-65535")
        literal = _ip_literal(host)
        if literal is not None:
            # The address first: "blocked range: loopback" says more than "port 8080".
            self.check_address(literal)
            self.check_port(parsed.scheme, parsed.port, (literal,))
        elif not _HOSTNAME.fullmatch(host):
            raise UnsafeURL(f"host {host!r} is not a valid DNS name")
        elif _odd_port(parsed.scheme, parsed.port) and not self.allowed_networks:
            # No address could ever be allowed another port: refuse now rather than at every send.
            raise UnsafeURL(_port_advice(parsed.scheme, parsed.port))
        return parsed

    def check_address(self, ip: IPAddress) -> None:
        """Refuse an address unless it is public unicast or in ``allowed_networks``."""
        reason = self._blocked_reason(ip)
        if reason is not None:
            raise UnsafeURL(f"{ip} is in a blocked range: {reason}")

    def check_port(
        self, scheme: str, port: int | None, addresses: Sequence[IPAddress], *, host: str | None = None
    ) -> None:
        """Refuse a port other than the scheme's own unless every address is in ``allowed_networks``.

        ``port`` None is the scheme's default. ``addresses`` are those a
        connection may use (the pinned ones); ``host`` names them in the error.
        """
        if not _odd_port(scheme, port):
            return
        for ip in addresses:
            if not self._covers(ip):
                where = f"{host} ({ip})" if host else str(ip)
                raise UnsafeURL(_port_advice(scheme, port, where))

    def _allowed(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.allowed_networks)

    def _covers(self, ip: IPAddress) -> bool:
        """In ``allowed_networks``, itself or as the IPv4 address its IPv6 form leads to."""
        if self._allowed(ip):
            return True
        embedded = _embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
        return embedded is not None and self._allowed(embedded[1])

    def _blocked_reason(self, ip: IPAddress) -> str | None:
        if self._allowed(ip):
            return None
        if isinstance(ip, ipaddress.IPv6Address):
            embedded = _embedded_ipv4(ip)
            if embedded is not None:
                kind, inner = embedded
                reason = self._blocked_reason(inner)
                return None if reason is None else f"{kind} of {inner}, {reason}"
        for net, label in _BLOCKED_V4 if ip.version == 4 else _BLOCKED_V6:
            if ip in net:
                return f"{label} ({net})"
        if not ip.is_global:
            return "not a globally routable address"
        return None


def _odd_port(scheme: str, port: int | None) -> bool:
    # httpx drops a port equal to the scheme's default, so None is the usual case.
    return port is not None and port != _DEFAULT_PORTS.get(scheme)


def _port_advice(scheme: str, port: int | None, where: str | None = None) -> str:
    """Why a port is refused, and the two ways out."""
    default = _DEFAULT_PORTS.get(scheme, 443)
    outside = f" to {where}, which is not in SYNTHGUARD_WEBHOOK_ALLOWED_NETWORKS" if where else ""
    return (
        f"port {port} is not allowed for callbacks{outside}: use {scheme}:// on port {default} "
        "(leave the port out), or ask the operator to add the receiver's network to "
        "SYNTHGUARD_WEBHOOK_ALLOWED_NETWORKS"
    )


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def resolve_pinned(
    host: str, port: int, policy: URLPolicy, *, resolver: Resolver = socket.getaddrinfo
) -> tuple[IPAddress, ...]:
    """Resolve ``host`` once and check every address; the result is all a connection may use.

    One blocked address refuses the whole host: a name that also points inward
    is either misconfigured or an attack, and saying so beats quietly picking.
    Raises :class:`UnsafeURL`, or :class:`OSError` (``socket.gaierror``) when
    the name does not resolve.
    """
    literal = _ip_literal(host)
    if literal is not None:
        policy.check_address(literal)
        return (literal,)
    found: list[IPAddress] = []
    for family, _type, _proto, _canon, sockaddr in resolver(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    ):
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(sockaddr[0])
        if ip not in found:
            found.append(ip)
    if not found:
        raise socket.gaierror(socket.EAI_NONAME, f"{host} has no IPv4 or IPv6 address")
    for ip in found:
        reason = policy._blocked_reason(ip)
        if reason is not None:
            raise UnsafeURL(f"{host} resolves to {ip}, which is in a blocked range: {reason}")
    return tuple(found)


# -------------------------------------------------------------- pinned transport


def _clamp(timeout: float | None, deadline: float, expired: type[Exception]) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise expired("the attempt's time budget is spent")
    return remaining if timeout is None else min(timeout, remaining)


class _DeadlineStream(httpcore.NetworkStream):
    """A stream whose every operation ends by the attempt's deadline.

    httpcore's timeouts are per operation, so a receiver dribbling one byte at
    a time could hold a worker for hours; this makes ``timeout_s`` a total.
    """

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _clamp(timeout, self._deadline, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _clamp(timeout, self._deadline, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(
            ssl_context, server_hostname, _clamp(timeout, self._deadline, httpcore.ConnectTimeout)
        )
        return _DeadlineStream(inner, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects to already-checked addresses only, whatever httpcore asks for: no DNS here."""

    def __init__(self, host: str, addresses: Sequence[IPAddress], deadline: float) -> None:
        self._host = host
        self._addresses = tuple(addresses)
        self._deadline = deadline
        self._tcp = httpcore.SyncBackend()
        self.connected: IPAddress | None = None

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        if host != self._host:
            # Only the origin we checked; nothing else (a proxy, a redirect) may slip in.
            raise httpcore.ConnectError(f"refusing to connect to {host!r}: only {self._host!r} was checked")
        failure: Exception | None = None
        # Every address passed the policy, so falling back (an AAAA that does not route) is safe.
        for ip in self._addresses:
            try:
                stream = self._tcp.connect_tcp(
                    str(ip),
                    port,
                    timeout=_clamp(timeout, self._deadline, httpcore.ConnectTimeout),
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
                continue
            self.connected = ip
            return _DeadlineStream(stream, self._deadline)
        assert failure is not None  # resolve_pinned never returns an empty tuple
        raise failure

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@lru_cache(maxsize=1)
def _default_ssl_context() -> ssl.SSLContext:
    # certifi's roots, as httpx uses by default; built once, loading them is not free.
    return httpcore.default_ssl_context()


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
    backend = _PinnedBackend(host, addresses, deadline)
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
