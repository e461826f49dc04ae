"""Webhook sender: signing, real HTTP deliveries to a scripted receiver, SSRF policy, retries.

The receiver is a real HTTP server on 127.0.0.1 in this process; it checks every
request with the reference ``standardwebhooks`` library. Nothing is mocked:
where a test needs particular DNS answers it passes ``deliver`` a resolver of
its own, which is part of the function's interface.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import ipaddress
import json
import math
import random
import secrets as secrets_module
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from worker import __version__
from worker.errors import UnsafeURL
from worker.netguard import URLPolicy, resolve_pinned
from worker.webhooks import (
    EVENT_IMAGE_FLAGGED,
    MAX_RESPONSE_BYTES,
    RETRY_AFTER_CAP_S,
    RETRY_SCHEDULE_S,
    AttemptResult,
    build_body,
    deliver,
    next_delay,
    parse_retry_after,
    sign,
)


def nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


LOCAL = URLPolicy(allow_http=True, allowed_networks=nets("127.0.0.1/32"))
STRICT_HTTP = URLPolicy(allow_http=True)  # the production block, but plain http for the local receiver
# The production block with an unrelated allowed network: a host name on the receiver's own
# (non-default) port is then judged by the address it resolves to, at send time.
STRICT_ELSEWHERE = URLPolicy(allow_http=True, allowed_networks=nets("192.0.2.0/24"))
BODY = build_body(
    EVENT_IMAGE_FLAGGED, {"image_id": "img_1", "score": 0.97}, timestamp=dt.datetime.now(dt.UTC)
)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets_module.token_bytes(32)).decode()


def addrinfo(*addresses: str, port: int = 0) -> list[tuple[Any, ...]]:
    """getaddrinfo's answer for these addresses."""
    out: list[tuple[Any, ...]] = []
    for text in addresses:
        ip = ipaddress.ip_address(text)
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        sockaddr = (text, port) if ip.version == 4 else (text, port, 0, 0)
        out.append((family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
    return out


class ScriptedResolver:
    """DNS that answers each lookup with the next scripted answer (the last one repeats)."""

    def __init__(self, *answers: tuple[str, ...]) -> None:
        self.answers = list(answers)
        self.calls: list[str] = []

    def __call__(self, host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        self.calls.append(host)
        answer = self.answers[min(len(self.calls), len(self.answers)) - 1]
        return addrinfo(*answer, port=port)


# ----------------------------------------------------------------------- receiver


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    hold: threading.Event | None = None  # answer only once the test sets it
    stream_bytes: int = 0  # send this many body bytes in chunks instead of ``body``
    drip_s: float = 0.0  # dribble a 200's head one byte per drip_s (100 of them) before finishing it


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    peer: str
    verified: dict[str, bool]  # secret -> did standardwebhooks accept the request with it alone


class Receiver:
    """A scripted webhook endpoint: replies in order, records and verifies every request."""

    def __init__(self, secrets: list[str], tls: ssl.SSLContext | None = None) -> None:
        self.secrets = secrets
        self.replies: deque[Reply] = deque()
        self.requests: list[Received] = []
        self.connections = 0
        self.sni: list[str | None] = []
        self.streamed = 0  # body bytes a streaming reply got out before the client hung up
        self.holds: list[threading.Event] = []
        self.closing = threading.Event()
        self.lock = threading.Lock()
        receiver = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request: Any, client_address: Any) -> None:
                with receiver.lock:
                    receiver.connections += 1
                super().process_request(request, client_address)

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients hanging up on purpose (timeouts, capped reads) are not errors here

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # the probe of connections_before_probe
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                verified = {}
                for secret in receiver.secrets:
                    try:
                        Webhook(secret).verify(body, headers)
                        verified[secret] = True
                    except WebhookVerificationError:
                        verified[secret] = False
                with receiver.lock:
                    receiver.requests.append(
                        Received(self.path, headers, body, self.client_address[0], verified)
                    )
                    reply = receiver.replies.popleft() if receiver.replies else Reply()
                if reply.hold is not None:
                    reply.hold.wait(30)
                if reply.drip_s:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
                    # Each byte comes well within any per-read timeout; only a total one ends this.
                    for _ in range(100):
                        if receiver.closing.wait(reply.drip_s):
                            return
                        self.wfile.write(b"a")
                    self.wfile.write(b"\r\nContent-Length: 0\r\n\r\n")
                    return
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(reply.stream_bytes or len(reply.body)))
                self.end_headers()
                if not reply.stream_bytes:
                    self.wfile.write(reply.body)
                    return
                chunk = b"x" * 65536
                for _ in range(reply.stream_bytes // len(chunk)):
                    self.wfile.write(chunk)
                    with receiver.lock:
                        receiver.streamed += len(chunk)

        self.server = Server(("127.0.0.1", 0), Handler)
        if tls is not None:
            tls.sni_callback = self._record_sni
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def _record_sni(self, sslobj: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        self.sni.append(name)

    def url(self, path: str = "/hook", host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def script(self, *replies: Reply) -> None:
        with self.lock:
            self.replies.extend(replies)
            self.holds += [r.hold for r in replies if r.hold is not None]

    def connections_before_probe(self) -> int:
        """Connections accepted before a fresh probe: the server accepts in order, so none are missed."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/probe")
            conn.getresponse().read()
        finally:
            conn.close()
        with self.lock:
            return self.connections - 1

    def close(self) -> None:
        self.closing.set()
        for hold in self.holds:
            hold.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def secret() -> str:
    return new_secret()


@pytest.fixture
def receiver(secret: str) -> Iterator[Receiver]:
    rec = Receiver([secret])
    yield rec
    rec.close()


def send(receiver: Receiver, secret: str, **kwargs: Any) -> AttemptResult:
    kwargs.setdefault("msg_id", "msg_" + uuid.uuid4().hex)
    kwargs.setdefault("body", BODY)
    kwargs.setdefault("secrets", [secret])
    kwargs.setdefault("policy", LOCAL)
    url = kwargs.pop("url", None) or receiver.url()
    return deliver(url, **kwargs)


# ------------------------------------------------------------------ signing, body


def test_sign_matches_standard_webhooks(secret: str) -> None:
    timestamp = int(time.time())
    signature = sign(secret, "msg_abc", timestamp, BODY)
    headers = {"webhook-id": "msg_abc", "webhook-timestamp": str(timestamp), "webhook-signature": signature}
    assert Webhook(secret).verify(BODY, headers)["type"] == EVENT_IMAGE_FLAGGED
    reference = Webhook(secret).sign("msg_abc", dt.datetime.fromtimestamp(timestamp, dt.UTC), BODY.decode())
    assert signature == reference
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY + b" ", headers)


def test_sign_accepts_unprefixed_secret_and_refuses_bad_ones(secret: str) -> None:
    assert sign(secret.removeprefix("whsec_"), "m", 1, b"{}") == sign(secret, "m", 1, b"{}")
    for bad in ("whsec_", "whsec_not base64!", ""):
        with pytest.raises(ValueError):
            sign(bad, "m", 1, b"{}")


def test_build_body_shape_is_compact_and_deterministic() -> None:
    moment = dt.datetime(2026, 3, 1, 13, 30, 5, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    image_id = uuid.uuid4()
    one = build_body(
        EVENT_IMAGE_FLAGGED, {"image_id": image_id, "score": 0.9, "key": "é.jpg"}, timestamp=moment
    )
    two = build_body(
        EVENT_IMAGE_FLAGGED, {"key": "é.jpg", "score": 0.9, "image_id": image_id}, timestamp=moment
    )
    assert one == two
    assert b" " not in one
    decoded = json.loads(one)
    assert decoded == {
        "type": "image.flagged",
        "timestamp": "2026-03-01T11:30:05.123456Z",
        "data": {"image_id": str(image_id), "score": 0.9, "key": "é.jpg"},
    }
    naive = build_body("scan.completed", {}, timestamp=dt.datetime(2026, 3, 1, 11, 30))
    assert json.loads(naive)["timestamp"] == "2026-03-01T11:30:00.000000Z"
    with pytest.raises(ValueError):
        build_body(EVENT_IMAGE_FLAGGED, {"score": math.nan}, timestamp=moment)


# ------------------------------------------------------------- real deliveries


def test_delivery_is_signed_and_verified(receiver: Receiver, secret: str) -> None:
    result = send(receiver, secret, msg_id="msg_one")
    assert result.ok and result.status == 200 and result.error is None
    assert not result.gone and not result.permanent
    assert result.address == "127.0.0.1"
    [got] = receiver.requests
    assert got.verified == {secret: True}
    assert got.body == BODY
    assert got.headers["content-type"] == "application/json"
    assert got.headers["user-agent"] == f"synthguard/{__version__}"
    assert got.headers["webhook-id"] == "msg_one"
    assert got.headers["host"] == f"127.0.0.1:{receiver.port}"


def test_two_secrets_both_sign_during_rotation() -> None:
    old, new, stranger = new_secret(), new_secret(), new_secret()
    rec = Receiver([old, new, stranger])
    try:
        result = send(rec, old, secrets=[old, new])
    finally:
        rec.close()
    assert result.ok
    [got] = rec.requests
    signatures = got.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    # Each secret alone verifies: receivers on either side of the rotation accept it.
    assert got.verified == {old: True, new: True, stranger: False}


def test_500_then_200_keeps_the_webhook_id(receiver: Receiver, secret: str) -> None:
    receiver.script(Reply(500), Reply(200))
    start = time.time()  # real time: the receiver checks the timestamp's tolerance
    first = send(receiver, secret, msg_id="msg_retry", now=lambda: start)
    second = send(receiver, secret, msg_id="msg_retry", now=lambda: start + 30)
    assert (first.ok, first.status, first.error, first.permanent) == (False, 500, "HTTP 500", False)
    assert (second.ok, second.status) == (True, 200)
    one, two = receiver.requests
    assert one.headers["webhook-id"] == two.headers["webhook-id"] == "msg_retry"
    assert int(two.headers["webhook-timestamp"]) - int(one.headers["webhook-timestamp"]) == 30
    assert one.verified[secret] and two.verified[secret]


def test_410_means_gone_and_permanent(receiver: Receiver, secret: str) -> None:
    receiver.script(Reply(410))
    result = send(receiver, secret)
    assert (result.ok, result.status, result.gone, result.permanent) == (False, 410, True, True)
    assert "410" in (result.error or "")


def test_redirect_is_not_followed(receiver: Receiver, secret: str) -> None:
    elsewhere = receiver.url("/elsewhere")
    receiver.script(Reply(302, headers={"Location": elsewhere}), Reply(200))
    result = send(receiver, secret)
    assert not result.ok and result.status == 302 and not result.permanent
    assert result.error == f"redirect not followed (302 to {elsewhere})"
    assert [r.path for r in receiver.requests] == ["/hook"]


def test_slow_receiver_times_out(receiver: Receiver, secret: str) -> None:
    release = threading.Event()
    receiver.script(Reply(200, hold=release))
    try:
        result = send(receiver, secret, timeout_s=0.3)
    finally:
        release.set()
    assert (result.ok, result.status, result.error, result.permanent) == (False, None, "timeout", False)
    assert len(receiver.requests) == 1  # it arrived; the answer did not


def test_timeout_bounds_the_whole_attempt(receiver: Receiver, secret: str) -> None:
    # A receiver dribbling its answer (a 200 after 2 s) never lets one read wait 0.5 s,
    # yet the attempt must end at 0.5 s.
    receiver.script(Reply(drip_s=0.02))
    result = send(receiver, secret, timeout_s=0.5)
    assert (result.ok, result.status, result.error) == (False, None, "timeout")


def test_response_body_read_is_capped(receiver: Receiver, secret: str) -> None:
    offered = 64 * 1024 * 1024
    receiver.script(Reply(200, stream_bytes=offered))
    result = send(receiver, secret, timeout_s=60)
    assert result.ok
    # We hung up after MAX_RESPONSE_BYTES; only socket buffers' worth more got out.
    assert receiver.connections_before_probe() == 1
    assert MAX_RESPONSE_BYTES <= receiver.streamed < offered // 2


def test_connection_refused_is_reported() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connecting is refused
        result = deliver(
            f"http://127.0.0.1:{port}/", msg_id="m", body=BODY, secrets=[new_secret()], policy=LOCAL
        )
    assert (result.ok, result.status, result.error, result.permanent) == (
        False,
        None,
        "connection refused",
        False,
    )


def test_dns_failure_is_transient(secret: str) -> None:
    def no_such_host(*args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    result = deliver(
        "https://hooks.example.invalid/",
        msg_id="m",
        body=BODY,
        secrets=[secret],
        policy=URLPolicy(),
        resolver=no_such_host,
    )
    assert not result.ok and not result.permanent and result.status is None
    assert result.error == "dns lookup failed for hooks.example.invalid: Name or service not known"


def test_caller_mistakes_raise(secret: str) -> None:
    with pytest.raises(ValueError, match="secret"):
        deliver("https://hooks.example/", msg_id="m", body=BODY, secrets=[], policy=URLPolicy())
    with pytest.raises(ValueError, match="id"):
        deliver("https://hooks.example/", msg_id="m\r\nx: y", body=BODY, secrets=[secret], policy=URLPolicy())


# ------------------------------------------------------------------- Retry-After


def test_retry_after_seconds(receiver: Receiver, secret: str) -> None:
    receiver.script(Reply(503, headers={"Retry-After": "7"}))
    result = send(receiver, secret)
    assert (result.status, result.error, result.retry_after_s) == (503, "HTTP 503", 7.0)


def test_retry_after_http_date(receiver: Receiver, secret: str) -> None:
    start = time.time()
    receiver.script(Reply(429, headers={"Retry-After": formatdate(start + 120, usegmt=True)}))
    result = send(receiver, secret, now=lambda: start)
    # HTTP dates have whole seconds: 120 s minus the fraction ``start`` had.
    assert result.status == 429 and result.retry_after_s is not None
    assert 119.0 < result.retry_after_s <= 120.0


def test_no_retry_after(receiver: Receiver, secret: str) -> None:
    receiver.script(Reply(429))
    assert send(receiver, secret).retry_after_s is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("Sun, 01 Mar 2026 12:02:00 GMT", 120.0),
        ("Sunday, 01-Mar-26 12:02:00 GMT", 120.0),
        ("Sun, 01 Mar 2026 11:00:00 GMT", 0.0),  # in the past: now
        ("-1", None),
        ("1.5", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC).timestamp()
    assert parse_retry_after(value, now=now) == expected


# ------------------------------------------------------------------ SSRF: URLs


@pytest.mark.parametrize(
    ("url_template", "range_label"),
    [
        ("http://127.0.0.1:{port}/hook", "loopback (127.0.0.0/8)"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://10.0.0.1/hook", "private (10.0.0.0/8)"),
        ("http://[::1]:{port}/hook", "loopback (::1/128)"),
        ("http://localhost:{port}/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]:{port}/hook", "IPv4-mapped form of 127.0.0.1, loopback"),
        ("http://[::ffff:169.254.169.254]/", "IPv4-mapped form of 169.254.169.254, link-local"),
        ("http://2130706433:{port}/hook", "loopback"),  # 127.0.0.1 as one number: the resolver decodes it
    ],
)
def test_internal_urls_are_refused_without_connecting(
    receiver: Receiver, secret: str, url_template: str, range_label: str
) -> None:
    result = send(receiver, secret, url=url_template.format(port=receiver.port), policy=STRICT_ELSEWHERE)
    assert not result.ok and result.permanent and result.status is None and result.address is None
    assert result.error is not None and result.error.startswith("unsafe url: ")
    assert "blocked range" in result.error and range_label in result.error
    assert receiver.connections_before_probe() == 0
    assert receiver.requests == []


def test_hostname_refusal_names_host_and_address(receiver: Receiver, secret: str) -> None:
    result = send(receiver, secret, url=receiver.url(host="localhost"), policy=STRICT_ELSEWHERE)
    assert result.error is not None
    assert result.error.startswith("unsafe url: localhost resolves to ")
    assert "which is in a blocked range: loopback" in result.error


def localhost_networks() -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """127.0.0.1/32, plus ::1/128 where this machine's ``localhost`` also means ::1."""
    found = {
        ipaddress.ip_address(info[4][0])
        for info in socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)
    }
    return (
        ipaddress.ip_network("127.0.0.1/32"),
        *tuple(ipaddress.ip_network(ip) for ip in found if ip.version == 6),
    )


def test_allowed_network_lets_localhost_through_and_connects_to_checked_address(
    receiver: Receiver, secret: str
) -> None:
    policy = URLPolicy(allow_http=True, allowed_networks=localhost_networks())
    result = send(receiver, secret, url=receiver.url(host="localhost"), policy=policy)
    assert result.ok, result.error
    assert result.address == "127.0.0.1"
    [got] = receiver.requests
    assert got.peer == "127.0.0.1"
    assert got.headers["host"] == f"localhost:{receiver.port}"  # the name, not the pinned address
    assert got.verified[secret]


def test_allowed_networks_allow_exactly_what_they_name() -> None:
    policy = URLPolicy(allowed_networks=nets("10.0.0.0/8", "169.254.169.254/32", "::1/128", "127.0.0.1/32"))
    for text in ("10.0.0.1", "10.255.0.9", "169.254.169.254", "::1", "127.0.0.1", "::ffff:127.0.0.1"):
        policy.check_address(ipaddress.ip_address(text))
    for text in ("127.0.0.2", "169.254.169.253", "192.168.0.1", "::ffff:127.0.0.2", "fe80::1"):
        with pytest.raises(UnsafeURL, match="blocked range"):
            policy.check_address(ipaddress.ip_address(text))
    policy.check_url("https://10.0.0.1/hook")
    policy.check_url("https://[::1]:8443/hook")


def test_policy_from_settings() -> None:
    from worker.settings import Settings

    settings = Settings.model_validate(
        {"webhook_allow_http": True, "webhook_allowed_networks": "10.0.0.0/8, 127.0.0.1/32"}
    )
    policy = URLPolicy.from_settings(settings)
    assert policy == URLPolicy(
        allow_http=True,
        allowed_networks=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32")),
    )
    assert URLPolicy.from_settings(Settings.model_validate({})) == URLPolicy()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://hooks.example/", "http:// is not allowed"),
        ("ftp://hooks.example/", "scheme 'ftp' is not allowed"),
        ("hooks.example/path", "URL has no scheme"),
        ("https://user:pw@hooks.example/", "credentials in the URL"),
        ("https://token@hooks.example/", "credentials in the URL"),
        ("https://hooks.example:0/", "port 0 is out of range"),
        ("https://hooks.example:70000/", "port 70000 is out of range"),
        ("https://hooks.example:http/", "malformed URL"),
        ("https:///path", "URL has no host"),
        ("https://hooks example/", "whitespace"),
        ("https://hooks.example/\r\nX-Evil: 1", "whitespace or control"),
        ("https://hooks%2eexample/", "not a valid DNS name"),
        ("", "empty URL"),
    ],
)
def test_check_url_refuses(url: str, why: str) -> None:
    with pytest.raises(UnsafeURL, match=why):
        URLPolicy().check_url(url)


def test_check_url_allows_without_dns() -> None:
    # .invalid never resolves: check_url must not try.
    URLPolicy().check_url("https://hooks.example.invalid/synthguard?x=1")
    URLPolicy().check_url("https://bücher.example/hook")
    URLPolicy().check_url("https://8.8.8.8/")
    URLPolicy().check_url("https://hooks.example.invalid:443/")  # the default port, spelt out
    # Another port: with an allowed network, the address it resolves to decides, at send time.
    URLPolicy(allow_http=True, allowed_networks=nets("10.0.0.0/8")).check_url("http://hooks.example.invalid:8080/")


# ------------------------------------------------------------------ SSRF: ports


@pytest.mark.parametrize(
    ("policy", "url", "advice"),
    [
        (URLPolicy(), "https://hooks.example.com:8443/in", "use https:// on port 443"),
        (URLPolicy(), "https://hooks.example.com:80/in", "use https:// on port 443"),
        (URLPolicy(allow_http=True), "http://hooks.example.com:8080/in", "use http:// on port 80"),
        (URLPolicy(allow_http=True), "http://hooks.example.com:443/in", "use http:// on port 80"),
        (URLPolicy(), "https://8.8.8.8:6379/", "use https:// on port 443"),
        (URLPolicy(allowed_networks=nets("10.0.0.0/8")), "https://8.8.8.8:8443/", "use https:// on port 443"),
    ],
)
def test_another_port_is_refused_outside_allowed_networks(policy: URLPolicy, url: str, advice: str) -> None:
    # A public name on 6379 or 8443 is how a webhook gets aimed at some other service.
    with pytest.raises(UnsafeURL, match="is not allowed for callbacks") as caught:
        policy.check_url(url)
    message = str(caught.value)
    assert advice in message and "SYNTHGUARD_WEBHOOK_ALLOWED_NETWORKS" in message  # says what to do


def test_another_port_is_allowed_inside_allowed_networks() -> None:
    loopback = URLPolicy(allow_http=True, allowed_networks=nets("127.0.0.0/8"))
    loopback.check_url("http://127.0.0.1:8080/hook")
    loopback.check_url("http://[::ffff:127.0.0.1]:8080/hook")  # the same address, IPv6-mapped
    URLPolicy().check_url("https://hooks.example.com/in")
    URLPolicy(allow_http=True).check_url("http://hooks.example.com:80/in")


def test_a_named_host_on_another_port_is_judged_by_its_pinned_address(
    receiver: Receiver, secret: str
) -> None:
    # check_url lets the name through (some network is allowed); the lookup decides, and a
    # public answer on the receiver's odd port is refused before any connection.
    policy = URLPolicy(allow_http=True, allowed_networks=nets("127.0.0.0/8"))
    url = receiver.url(host="hooks.example.invalid")
    policy.check_url(url)
    for answer in (("93.184.215.14",), ("127.0.0.1", "93.184.215.14")):  # every address must be inside
        result = send(receiver, secret, url=url, policy=policy, resolver=ScriptedResolver(answer))
        assert not result.ok and result.permanent and result.status is None and result.address is None
        assert result.error is not None and result.error.startswith("unsafe url: ")
        assert f"port {receiver.port} is not allowed for callbacks to hooks.example.invalid (93.184.215.14)" in (
            result.error
        )
        assert "SYNTHGUARD_WEBHOOK_ALLOWED_NETWORKS" in result.error
    assert receiver.connections_before_probe() == 0
    inside = send(receiver, secret, url=url, policy=policy, resolver=ScriptedResolver(("127.0.0.1",)))
    assert inside.ok, inside.error


def test_http_delivery_needs_allow_http(receiver: Receiver, secret: str) -> None:
    policy = URLPolicy(allowed_networks=LOCAL.allowed_networks)
    result = send(receiver, secret, policy=policy)
    assert result.permanent and result.error is not None and "http:// is not allowed" in result.error
    assert receiver.connections_before_probe() == 0


# -------------------------------------------------------------- SSRF: addresses


@pytest.mark.parametrize(
    ("address", "label"),
    [
        ("127.0.0.1", "loopback (127.0.0.0/8)"),
        ("127.255.255.254", "loopback"),
        ("10.1.2.3", "private (10.0.0.0/8)"),
        ("172.16.0.1", "private (172.16.0.0/12)"),
        ("172.31.255.255", "private (172.16.0.0/12)"),
        ("192.168.1.1", "private (192.168.0.0/16)"),
        ("169.254.169.254", "link-local"),
        ("168.63.129.16", "Azure WireServer (platform metadata) (168.63.129.16/32)"),
        ("100.100.100.200", "Alibaba Cloud instance metadata (100.100.100.200/32)"),
        ("100.64.0.1", "carrier-grade NAT (100.64.0.0/10)"),
        ("100.127.255.254", "carrier-grade NAT"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("240.0.0.1", "reserved (240.0.0.0/4)"),
        ("255.255.255.255", "broadcast"),
        ("192.0.2.10", "documentation"),
        ("198.51.100.10", "documentation"),
        ("203.0.113.10", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("192.0.0.8", "IETF protocol assignments"),
        ("::1", "loopback (::1/128)"),
        ("::", "unspecified"),
        ("fe80::1", "link-local (fe80::/10)"),
        ("fd00:ec2::254", "AWS instance metadata (IPv6) (fd00:ec2::254/128)"),
        ("fd00:ec2::253", "unique-local (fc00::/7)"),
        ("fc00::1", "unique-local (fc00::/7)"),
        ("fd12:3456:789a::1", "unique-local"),
        ("fec0::1", "site-local"),
        ("ff02::1", "multicast"),
        ("ff0e::1", "multicast"),
        ("2001:db8::1", "documentation"),
        ("100::1", "discard-only"),
        ("::127.0.0.1", "IPv4-compatible"),
        ("::ffff:127.0.0.1", "IPv4-mapped form of 127.0.0.1, loopback"),
        ("::ffff:10.0.0.1", "IPv4-mapped form of 10.0.0.1, private"),
        ("::ffff:169.254.169.254", "IPv4-mapped form of 169.254.169.254, link-local"),
        ("::ffff:100.64.0.1", "IPv4-mapped form of 100.64.0.1, carrier-grade NAT"),
        ("::ffff:168.63.129.16", "IPv4-mapped form of 168.63.129.16, Azure WireServer"),
        ("64:ff9b::a00:1", "NAT64 form of 10.0.0.1, private"),
        ("64:ff9b::a9fe:a9fe", "NAT64 form of 169.254.169.254, link-local"),
        ("64:ff9b:1::a00:1", "local-use NAT64"),
        ("2002:a00:1::1", "6to4 form of 10.0.0.1, private"),
        ("2002:7f00:1::", "6to4 form of 127.0.0.1, loopback"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ],
)
def test_blocked_addresses(address: str, label: str) -> None:
    with pytest.raises(UnsafeURL, match="blocked range") as caught:
        URLPolicy().check_address(ipaddress.ip_address(address))
    assert label in str(caught.value)


@pytest.mark.parametrize(
    ("url", "label"),
    [
        ("https://168.63.129.16/machine?comp=goalstate", "Azure WireServer"),
        ("http://100.100.100.200/latest/meta-data/", "Alibaba Cloud instance metadata"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "AWS instance metadata (IPv6)"),
    ],
)
def test_cloud_metadata_services_are_refused(url: str, label: str) -> None:
    with pytest.raises(UnsafeURL, match="blocked range") as caught:
        URLPolicy(allow_http=True).check_url(url)
    assert label in str(caught.value)
    # And a name that resolves there is refused at send time, before any connection.
    host = url.split("/")[2].strip("[]")
    with pytest.raises(UnsafeURL, match=f"metadata.example resolves to {host}, which is in a blocked range") as at_send:
        resolve_pinned("metadata.example", 443, URLPolicy(), resolver=ScriptedResolver((host,)))
    assert label in str(at_send.value)


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.215.14",
        "172.32.0.1",  # just outside 172.16/12
        "168.63.129.17",  # Azure's WireServer is one address, not its neighbours
        "100.128.0.1",  # just outside 100.64/10
        "2606:4700:4700::1111",
        "2a00:1450:4001:80b::200e",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
    ],
)
def test_public_addresses_pass(address: str) -> None:
    URLPolicy().check_address(ipaddress.ip_address(address))


# --------------------------------------------------------- DNS pinning / rebinding


def test_resolve_pinned_uses_the_first_answer_only() -> None:
    # A rebinding name: public when checked, private when asked again.
    resolver = ScriptedResolver(("93.184.215.14",), ("127.0.0.1",))
    pinned = resolve_pinned("rebind.example", 443, URLPolicy(), resolver=resolver)
    assert pinned == (ipaddress.ip_address("93.184.215.14"),)
    assert resolver.calls == ["rebind.example"]


def test_resolve_pinned_checks_every_address() -> None:
    resolver = ScriptedResolver(("93.184.215.14", "2606:4700::1", "10.0.0.7"))
    with pytest.raises(
        UnsafeURL, match=r"rebind\.example resolves to 10\.0\.0\.7, which is in a blocked range: private"
    ):
        resolve_pinned("rebind.example", 443, URLPolicy(), resolver=resolver)


def test_resolve_pinned_skips_resolver_for_literals() -> None:
    resolver = ScriptedResolver(("10.0.0.1",))
    assert resolve_pinned("8.8.8.8", 443, URLPolicy(), resolver=resolver) == (
        ipaddress.ip_address("8.8.8.8"),
    )
    assert resolver.calls == []


def test_connection_goes_to_the_checked_address_not_a_second_lookup(receiver: Receiver, secret: str) -> None:
    # ``.invalid`` never resolves in real DNS: had the HTTP stack looked it up again, it would fail;
    # had it used a later answer of ours, it would reach a blocked address.
    resolver = ScriptedResolver(("127.0.0.1",), ("169.254.169.254",))
    url = receiver.url(host="hooks.rebind.invalid")
    result = send(receiver, secret, url=url, resolver=resolver)
    assert result.ok, result.error
    assert resolver.calls == ["hooks.rebind.invalid"]
    assert result.address == "127.0.0.1"
    [got] = receiver.requests
    assert got.headers["host"] == f"hooks.rebind.invalid:{receiver.port}"


def test_falls_back_to_the_next_checked_address(receiver: Receiver, secret: str) -> None:
    # 127.0.0.2 is allowed but nothing listens there; 127.0.0.1 is next.
    policy = URLPolicy(allow_http=True, allowed_networks=nets("127.0.0.0/8"))
    resolver = ScriptedResolver(("127.0.0.2", "127.0.0.1"))
    result = send(receiver, secret, url=receiver.url(host="hooks.invalid"), policy=policy, resolver=resolver)
    assert result.ok, result.error
    assert result.address == "127.0.0.1"


# ------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class Pki:
    ca_pem: bytes
    cert_file: Path
    key_file: Path


def make_pki(directory: Path, server_name: str) -> Pki:
    """A throwaway CA and a server certificate it signed for ``server_name``."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "synthguard test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{server_name}.pem", directory / f"{server_name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return Pki(ca.public_bytes(serialization.Encoding.PEM), cert_file, key_file)


TLS_HOST = "hooks.synthguard.invalid"


@pytest.fixture
def tls_receiver(
    tmp_path: Path, secret: str, request: pytest.FixtureRequest
) -> Iterator[tuple[Receiver, Pki]]:
    server_name = getattr(request, "param", TLS_HOST)
    pki = make_pki(tmp_path, server_name)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert_file, pki.key_file)
    rec = Receiver([secret], tls=context)
    yield rec, pki
    rec.close()


def client_context(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=pki.ca_pem.decode())


def test_https_to_pinned_address_keeps_sni_and_verifies_the_name(
    tls_receiver: tuple[Receiver, Pki], secret: str
) -> None:
    rec, pki = tls_receiver
    resolver = ScriptedResolver(("127.0.0.1",), ("10.0.0.1",))
    url = rec.url(host=TLS_HOST, scheme="https")
    result = send(rec, secret, url=url, resolver=resolver, ssl_context=client_context(pki), policy=LOCAL)
    assert result.ok, result.error
    assert result.address == "127.0.0.1"
    assert resolver.calls == [TLS_HOST]
    assert rec.sni == [TLS_HOST]
    [got] = rec.requests
    assert got.headers["host"] == f"{TLS_HOST}:{rec.port}"
    assert got.verified[secret]


@pytest.mark.parametrize("tls_receiver", ["someone-else.invalid"], indirect=True)
def test_https_certificate_for_another_name_is_rejected(
    tls_receiver: tuple[Receiver, Pki], secret: str
) -> None:
    rec, pki = tls_receiver
    url = rec.url(host=TLS_HOST, scheme="https")
    resolver = ScriptedResolver(("127.0.0.1",))
    result = send(rec, secret, url=url, resolver=resolver, ssl_context=client_context(pki), policy=LOCAL)
    assert not result.ok and result.status is None and not result.permanent
    assert result.error is not None and result.error.startswith("tls certificate rejected")
    assert "someone-else.invalid" in result.error or "mismatch" in result.error.lower()
    assert rec.requests == []


def test_https_default_trust_rejects_unknown_ca(tls_receiver: tuple[Receiver, Pki], secret: str) -> None:
    rec, _pki = tls_receiver
    url = rec.url(host=TLS_HOST, scheme="https")
    result = send(rec, secret, url=url, resolver=ScriptedResolver(("127.0.0.1",)), policy=LOCAL)
    assert result.error is not None and result.error.startswith("tls certificate rejected")
    assert rec.requests == []


# ------------------------------------------------------------------ retry policy


class Extreme:
    """An rng that always draws the low (or high) end, to pin the jitter bounds."""

    def __init__(self, high: bool) -> None:
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


def test_schedule_spans_about_a_day() -> None:
    total = sum(RETRY_SCHEDULE_S)
    assert 20 * 3600 <= total <= 26 * 3600
    assert list(RETRY_SCHEDULE_S) == sorted(RETRY_SCHEDULE_S)


def test_next_delay_follows_the_schedule_with_jitter() -> None:
    rng = random.Random(1234)
    for attempt, base in enumerate(RETRY_SCHEDULE_S, start=1):
        assert next_delay(attempt, retry_after_s=None, rng=Extreme(high=False)) == pytest.approx(base * 0.8)
        assert next_delay(attempt, retry_after_s=None, rng=Extreme(high=True)) == pytest.approx(base * 1.2)
        draws = [next_delay(attempt, retry_after_s=None, rng=rng) for _ in range(200)]
        assert all(d is not None and base * 0.8 <= d <= base * 1.2 for d in draws)
        assert len(set(draws)) > 100  # it really is jittered


def test_next_delay_gives_up_after_the_schedule() -> None:
    assert next_delay(len(RETRY_SCHEDULE_S), retry_after_s=None) is not None
    assert next_delay(len(RETRY_SCHEDULE_S) + 1, retry_after_s=None) is None
    assert next_delay(len(RETRY_SCHEDULE_S) + 1, retry_after_s=60) is None
    with pytest.raises(ValueError):
        next_delay(0, retry_after_s=None)


def test_next_delay_honours_retry_after_within_bounds() -> None:
    low, high = Extreme(high=False), Extreme(high=True)
    # Longer than scheduled: honoured, never earlier, at most 10% later.
    assert next_delay(1, retry_after_s=300, rng=low) == 300
    assert next_delay(1, retry_after_s=300, rng=high) == pytest.approx(330)
    # Shorter than scheduled: the schedule wins (a receiver cannot make us hammer it).
    assert next_delay(5, retry_after_s=1, rng=low) == pytest.approx(RETRY_SCHEDULE_S[4] * 0.8)
    assert next_delay(5, retry_after_s=0, rng=low) == pytest.approx(RETRY_SCHEDULE_S[4] * 0.8)
    # Absurd: capped at a day.
    assert next_delay(1, retry_after_s=30 * 86400, rng=high) == RETRY_AFTER_CAP_S
    assert next_delay(1, retry_after_s=math.inf, rng=low) == pytest.approx(5 * 0.8)
    assert next_delay(1, retry_after_s=-5, rng=low) == pytest.approx(5 * 0.8)


def test_next_delay_with_a_configured_schedule() -> None:
    from worker.settings import Settings

    schedule = Settings.model_validate({"webhook_retry_schedule_s": "1, 60"}).webhook_retry_schedule_s
    low = Extreme(high=False)
    assert next_delay(1, retry_after_s=None, rng=low, schedule=schedule) == pytest.approx(0.8)
    assert next_delay(2, retry_after_s=None, rng=low, schedule=schedule) == pytest.approx(48)
    assert next_delay(3, retry_after_s=None, rng=low, schedule=schedule) is None
    assert next_delay(1, retry_after_s=None, schedule=()) is None
