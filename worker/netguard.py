"""SSRF guard for callback URLs: which URLs and addresses may be reached, and connections pinned to them.

One rule, :class:`URLPolicy`, judges a callback URL at intake (the API, the
CLI) and again at every send (:func:`worker.webhooks.deliver`). Refusals raise
:class:`~worker.errors.UnsafeURL`.

Pinning: :func:`resolve_pinned` resolves the host once; every address it
resolves to must pass :meth:`URLPolicy.check_address`; a connection then goes
to those checked addresses only (:class:`PinnedBackend`, an httpcore network
backend that ignores DNS), while the URL keeps its host name, so the ``Host``
header, TLS SNI and certificate verification all use the name. A second
lookup by the HTTP stack, the gap DNS rebinding exploits, never happens.

Ports: a callback URL uses its scheme's port (443 for https, 80 for http)
unless the receiver is inside ``allowed_networks``. An IP literal is judged by
:meth:`URLPolicy.check_url`; a host name on another port is refused there when
no network is allowed, and otherwise judged at send time by
:meth:`URLPolicy.check_port` on the pinned addresses.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpcore
import httpx

from .errors import UnsafeURL

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "IPAddress",
    "IPNetwork",
    "PinnedBackend",
    "Resolver",
    "URLPolicy",
    "resolve_pinned",
]

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
        """:meth:`check_url`, returning the parsed URL that webhook delivery then uses as is."""
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


class PinnedBackend(httpcore.NetworkBackend):
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
