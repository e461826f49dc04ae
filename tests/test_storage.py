"""worker.storage against a real moto S3 server and tiny real HTTP servers; no boto3 mocks."""

from __future__ import annotations

import hashlib
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)
from urllib3.exceptions import ProtocolError

from worker import errors
from worker.errors import ConfigError, PermanentError, SynthguardError, TransientError
from worker.settings import Settings
from worker.storage import ObjectRef, Storage, classify_client_error, iter_local, parse_s3_uri

# ---------------------------------------------------------------------- fixtures


@pytest.fixture
def no_botocore_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """One attempt per call (the standard AWS variable), so failure tests stay fast."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")


@pytest.fixture(params=["botocore", "obstore"])
def s3_client_kind(request: pytest.FixtureRequest) -> str:
    """``SYNTHGUARD_S3_CLIENT``: every storage test runs with both."""
    return str(request.param)


@pytest.fixture
def make_storage(
    s3_client_kind: str, settings_factory: Callable[..., Settings]
) -> Iterator[Callable[..., Storage]]:
    """Storages built from test settings, closed after the test."""
    made: list[Storage] = []

    def build(endpoint: str | None, **overrides: Any) -> Storage:
        values: dict[str, Any] = {
            "s3_endpoint_url": endpoint,
            "s3_connect_timeout_s": 2.0,
            "s3_read_timeout_s": 5.0,
            "s3_client": s3_client_kind,
        }
        values.update(overrides)
        storage = Storage(settings_factory(**values))
        made.append(storage)
        return storage

    yield build
    for storage in made:
        storage.close()


@pytest.fixture
def storage(make_storage: Callable[..., Storage], s3_endpoint: str) -> Storage:
    return make_storage(s3_endpoint)


class _CannedHandler(BaseHTTPRequestHandler):
    """Answers every request with the server's canned status, headers and body."""

    server: _CannedServer

    def _answer(self, with_body: bool) -> None:
        self.server.requests += 1
        status, headers, body = self.server.canned
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers and self.server.send_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output clean


class _CannedServer(ThreadingHTTPServer):
    daemon_threads = True
    canned: tuple[int, dict[str, str], bytes]
    send_length: bool = True
    requests: int = 0


@pytest.fixture
def canned_server() -> Iterator[Callable[..., _CannedServer]]:
    """Start a real HTTP server on 127.0.0.1 that gives one fixed answer."""
    servers: list[tuple[_CannedServer, threading.Thread]] = []

    def start(
        status: int, body: bytes, headers: dict[str, str] | None = None, *, send_length: bool = True
    ) -> _CannedServer:
        server = _CannedServer(("127.0.0.1", 0), _CannedHandler)
        server.canned = (status, headers or {}, body)
        server.send_length = send_length
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return server

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join()


def _endpoint(server: _CannedServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host!s}:{port}"


def _s3_error_xml(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>4442587FB7D0A2F9</RequestId><HostId>test</HostId></Error>"
    ).encode()


def _code_of(excinfo: pytest.ExceptionInfo[SynthguardError]) -> str:
    return excinfo.value.code


# -------------------------------------------------------------------- refs, URIs


def test_object_ref_uri() -> None:
    assert ObjectRef("b", "a/b.jpg").uri == "s3://b/a/b.jpg"
    assert ObjectRef("b", "k", "v1").uri == "s3://b/k?versionId=v1"
    assert not ObjectRef("b", "k").is_local
    local = ObjectRef(None, "/data/x.png")
    assert local.is_local and local.uri == "/data/x.png"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/prefix/x", ("bucket", "prefix/x")),
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
        ("S3://bucket/k", ("bucket", "k")),
    ],
)
def test_parse_s3_uri(uri: str, expected: tuple[str, str]) -> None:
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri", ["bucket/key", "http://bucket/key", "s3://", "s3:///key", "s3://my bucket/k"])
def test_parse_s3_uri_rejects(uri: str) -> None:
    with pytest.raises(ValueError, match=r"S3 URI|bucket"):
        parse_s3_uri(uri)


# ------------------------------------------------------------------ S3 via moto


def test_fetch_returns_bytes_etag_and_digest(storage: Storage, s3_client: Any, bucket: str) -> None:
    payload = b"\x89PNG not really" * 10
    put = s3_client.put_object(Bucket=bucket, Key="a/img.png", Body=payload)

    got = storage.fetch(ObjectRef(bucket, "a/img.png"))

    assert got.data == payload
    assert got.size == len(payload)
    assert got.sha256 == hashlib.sha256(payload).hexdigest()
    assert got.etag == put["ETag"].strip('"')
    assert got.etag and '"' not in got.etag
    assert got.version_id is None  # unversioned bucket
    assert got.ref == ObjectRef(bucket, "a/img.png")
    assert storage.head(ObjectRef(bucket, "a/img.png")) == (got.etag, None)


def test_fetch_older_version(storage: Storage, s3_client: Any, bucket: str) -> None:
    s3_client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    old = s3_client.put_object(Bucket=bucket, Key="k", Body=b"old bytes")
    new = s3_client.put_object(Bucket=bucket, Key="k", Body=b"new bytes!")

    latest = storage.fetch(ObjectRef(bucket, "k"))
    pinned = storage.fetch(ObjectRef(bucket, "k", old["VersionId"]))

    assert (latest.data, latest.version_id) == (b"new bytes!", new["VersionId"])
    assert (pinned.data, pinned.version_id) == (b"old bytes", old["VersionId"])
    assert pinned.etag == old["ETag"].strip('"')
    assert storage.head(ObjectRef(bucket, "k", old["VersionId"])) == (pinned.etag, old["VersionId"])


@pytest.mark.parametrize("case", ["key", "bucket", "version"])
def test_missing_object_is_not_found(storage: Storage, s3_client: Any, bucket: str, case: str) -> None:
    s3_client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    put = s3_client.put_object(Bucket=bucket, Key="present", Body=b"x")
    ref = {
        "key": ObjectRef(bucket, "absent"),
        "bucket": ObjectRef(f"{bucket}-gone", "present"),
        "version": ObjectRef(bucket, "present", put["VersionId"][:-4] + "0000"),
    }[case]

    with pytest.raises(PermanentError) as excinfo:
        storage.fetch(ref)
    assert _code_of(excinfo) == errors.OBJECT_NOT_FOUND
    assert ref.uri in excinfo.value.message
    assert f"no such {case}" in excinfo.value.message

    with pytest.raises(PermanentError) as head_info:
        storage.head(ref)
    assert _code_of(head_info) == errors.OBJECT_NOT_FOUND


def test_oversize_object_is_refused(
    make_storage: Callable[..., Storage], s3_endpoint: str, s3_client: Any, bucket: str
) -> None:
    storage = make_storage(s3_endpoint, max_image_bytes=16)
    s3_client.put_object(Bucket=bucket, Key="big", Body=b"x" * 17)
    s3_client.put_object(Bucket=bucket, Key="fits", Body=b"y" * 16)

    with pytest.raises(PermanentError) as excinfo:
        storage.fetch(ObjectRef(bucket, "big"))
    assert _code_of(excinfo) == errors.OBJECT_TOO_LARGE
    assert "17 bytes" in excinfo.value.message and "16 bytes" in excinfo.value.message
    assert storage.fetch(ObjectRef(bucket, "fits")).data == b"y" * 16


def test_list_prefix_pages_in_key_order(storage: Storage, s3_client: Any, bucket: str) -> None:
    keys = ["p/b.jpg", "p/a.jpg", "p/sub/c.png", "p/sub/d", "p/e.txt", "p/f.webp", "p/g.heic"]
    for key in keys:
        s3_client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    for marker in ("p/", "p/sub/", "p/empty/"):
        s3_client.put_object(Bucket=bucket, Key=marker, Body=b"")
    s3_client.put_object(Bucket=bucket, Key="other/z.jpg", Body=b"z")

    refs = list(storage.list_prefix(bucket, "p/", page_size=2))

    assert [ref.key for ref in refs] == sorted(keys)
    assert all(ref.bucket == bucket and ref.version_id is None for ref in refs)
    assert len(list(storage.list_prefix(bucket, page_size=2))) == len(keys) + 1


def test_list_prefix_missing_bucket(storage: Storage, bucket: str) -> None:
    with pytest.raises(PermanentError) as excinfo:
        list(storage.list_prefix(f"{bucket}-gone", "x/"))
    assert _code_of(excinfo) == errors.OBJECT_NOT_FOUND
    assert "no such bucket" in excinfo.value.message


def test_concurrent_fetches_share_one_client(storage: Storage, s3_client: Any, bucket: str) -> None:
    payloads = {f"k{i:02d}": bytes([i]) * (100 + i) for i in range(24)}
    for key, body in payloads.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    client = storage.client

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda key: storage.fetch(ObjectRef(bucket, key)), sorted(payloads) * 2))

    assert [r.data for r in results] == [payloads[k] for k in sorted(payloads)] * 2
    assert storage.client is client


def test_client_config(
    make_storage: Callable[..., Storage],
    settings_factory: Callable[..., Settings],
    s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    config = make_storage(s3_endpoint, concurrency=12, s3_connect_timeout_s=1.5).client.meta.config
    assert config.max_pool_connections == 24
    assert config.connect_timeout == 1.5
    assert config.retries == {"mode": "standard", "total_max_attempts": 3}
    assert config.s3 == {"addressing_style": "path"}
    explicit = Storage(settings_factory(s3_endpoint_url=s3_endpoint), max_pool_connections=3)
    assert explicit.client.meta.config.max_pool_connections == 3
    explicit.close()


# ------------------------------------------------------- failures over real HTTP


def test_closed_port_is_transient(make_storage: Callable[..., Storage], no_botocore_retries: None) -> None:
    # A bound socket that never listens: connections are refused, and no one else gets the port.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        storage = make_storage(f"http://127.0.0.1:{port}", s3_connect_timeout_s=0.5, s3_read_timeout_s=0.5)
        ref = ObjectRef("bucket", "key.jpg")
        with pytest.raises(TransientError) as excinfo:
            storage.fetch(ref)
        with pytest.raises(TransientError):
            list(storage.list_prefix("bucket"))
    assert _code_of(excinfo) == errors.STORAGE_UNAVAILABLE
    assert ref.uri in excinfo.value.message


def test_slowdown_503_is_transient(
    make_storage: Callable[..., Storage],
    canned_server: Callable[..., _CannedServer],
    no_botocore_retries: None,
) -> None:
    server = canned_server(
        503,
        _s3_error_xml("SlowDown", "Please reduce your request rate."),
        {"Content-Type": "application/xml"},
    )
    storage = make_storage(_endpoint(server))

    with pytest.raises(TransientError) as excinfo:
        storage.fetch(ObjectRef("bucket", "k.jpg"))
    assert _code_of(excinfo) == errors.STORAGE_UNAVAILABLE
    assert "SlowDown" in excinfo.value.message
    assert server.requests == 1  # AWS_MAX_ATTEMPTS is honoured


def test_access_denied_403_is_permanent(
    make_storage: Callable[..., Storage],
    canned_server: Callable[..., _CannedServer],
    no_botocore_retries: None,
) -> None:
    server = canned_server(
        403, _s3_error_xml("AccessDenied", "Access Denied"), {"Content-Type": "application/xml"}
    )
    storage = make_storage(_endpoint(server))
    ref = ObjectRef("bucket", "secret.jpg")

    with pytest.raises(PermanentError) as excinfo:
        storage.fetch(ref)
    assert _code_of(excinfo) == errors.ACCESS_DENIED
    assert ref.uri in excinfo.value.message and "access denied" in excinfo.value.message
    with pytest.raises(PermanentError) as head_info:
        storage.head(ref)  # HEAD: a bare 403, no body
    assert _code_of(head_info) == errors.ACCESS_DENIED


def test_an_s3_error_body_reaches_the_message_only_as_code_and_message(
    make_storage: Callable[..., Storage],
    canned_server: Callable[..., _CannedServer],
    no_botocore_retries: None,
) -> None:
    body = (
        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SignatureDoesNotMatch</Code>"
        b"<Message>The request signature we calculated does not match</Message>"
        b"<AWSAccessKeyId>AKIAEXAMPLEKEYID</AWSAccessKeyId><StringToSign>AWS4-HMAC-SHA256 signed-text</StringToSign>"
        b"</Error>"
    )
    server = canned_server(403, body, {"Content-Type": "application/xml"})
    storage = make_storage(_endpoint(server))

    with pytest.raises(PermanentError) as excinfo:
        storage.fetch(ObjectRef("bucket", "k.jpg"))
    shown = "".join(traceback.format_exception(excinfo.value))  # what a logged traceback prints
    assert _code_of(excinfo) == errors.ACCESS_DENIED
    assert "SignatureDoesNotMatch" in shown and "does not match" in shown
    assert "AKIAEXAMPLEKEYID" not in shown and "signed-text" not in shown


def test_body_without_length_is_capped(
    make_storage: Callable[..., Storage],
    canned_server: Callable[..., _CannedServer],
    s3_client_kind: str,
    no_botocore_retries: None,
) -> None:
    # No Content-Length: the cap must hold while reading, not only from the header.
    server = canned_server(200, b"z" * 5000, {"ETag": '"abc"'}, send_length=False)
    storage = make_storage(_endpoint(server), max_image_bytes=100)

    if s3_client_kind == "obstore":
        # obstore reads no body whose size is undeclared: the store is at fault, and nothing is read.
        with pytest.raises(TransientError) as unsized:
            storage.fetch(ObjectRef("bucket", "stream.jpg"))
        assert _code_of(unsized) == errors.STORAGE_UNAVAILABLE
        return
    with pytest.raises(PermanentError) as excinfo:
        storage.fetch(ObjectRef("bucket", "stream.jpg"))
    assert _code_of(excinfo) == errors.OBJECT_TOO_LARGE


def test_obstore_chosen_without_its_package_stops_the_start(
    settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "obstore", None)  # what an install without the extra has
    with pytest.raises(ConfigError, match=r"pip install 'synthguard\[obstore\]'"):
        Storage(settings_factory(s3_client="obstore"))
    Storage(settings_factory(s3_client="botocore")).close()


def test_missing_credentials_is_config_error(
    make_storage: Callable[..., Storage], s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID"):
        make_storage(s3_endpoint).fetch(ObjectRef("bucket", "k"))


# ------------------------------------------------------------ pure classification


def _client_error(code: str, status: int, message: str = "msg", **extra: str) -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message, **extra},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": {}},
    }
    return ClientError(response, "GetObject")


@pytest.mark.parametrize(
    ("exc", "kind", "code", "words"),
    [
        (_client_error("NoSuchKey", 404), PermanentError, errors.OBJECT_NOT_FOUND, "no such key"),
        (_client_error("NoSuchBucket", 404), PermanentError, errors.OBJECT_NOT_FOUND, "no such bucket"),
        (_client_error("NoSuchVersion", 404), PermanentError, errors.OBJECT_NOT_FOUND, "no such version"),
        (_client_error("404", 404, "Not Found"), PermanentError, errors.OBJECT_NOT_FOUND, "not found"),
        (
            _client_error("InvalidArgument", 400, "Invalid version id specified", ArgumentName="versionId"),
            PermanentError,
            errors.OBJECT_NOT_FOUND,
            "invalid version id",
        ),
        (_client_error("AccessDenied", 403), PermanentError, errors.ACCESS_DENIED, "access denied"),
        (_client_error("403", 403, "Forbidden"), PermanentError, errors.ACCESS_DENIED, "access denied"),
        (_client_error("AllAccessDisabled", 403), PermanentError, errors.ACCESS_DENIED, "disabled"),
        (_client_error("InvalidObjectState", 403), PermanentError, errors.ACCESS_DENIED, "Glacier"),
        (_client_error("SlowDown", 503), TransientError, errors.STORAGE_UNAVAILABLE, "SlowDown"),
        (_client_error("Throttling", 400), TransientError, errors.STORAGE_UNAVAILABLE, "Throttling"),
        (
            _client_error("ThrottlingException", 400),
            TransientError,
            errors.STORAGE_UNAVAILABLE,
            "unavailable",
        ),
        (
            _client_error("RequestLimitExceeded", 400),
            TransientError,
            errors.STORAGE_UNAVAILABLE,
            "unavailable",
        ),
        (_client_error("RequestTimeout", 400), TransientError, errors.STORAGE_UNAVAILABLE, "RequestTimeout"),
        (_client_error("InternalError", 500), TransientError, errors.STORAGE_UNAVAILABLE, "InternalError"),
        (_client_error("500", 500), TransientError, errors.STORAGE_UNAVAILABLE, "unavailable"),
        (_client_error("502", 502), TransientError, errors.STORAGE_UNAVAILABLE, "unavailable"),
        (_client_error("503", 503), TransientError, errors.STORAGE_UNAVAILABLE, "unavailable"),
        (_client_error("504", 504), TransientError, errors.STORAGE_UNAVAILABLE, "unavailable"),
        (_client_error("SomethingNew", 418), PermanentError, errors.ACCESS_DENIED, "rejected"),
        (_client_error("GoneMissing", 404), PermanentError, errors.OBJECT_NOT_FOUND, "not found"),
        (
            _client_error("InvalidArgument", 400, "bad range"),
            PermanentError,
            errors.ACCESS_DENIED,
            "rejected",
        ),
        (_client_error("Weird", 599), TransientError, errors.STORAGE_UNAVAILABLE, "unavailable"),
        (
            EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
            TransientError,
            errors.STORAGE_UNAVAILABLE,
            "unavailable",
        ),
        (
            ConnectTimeoutError(endpoint_url="http://x"),
            TransientError,
            errors.STORAGE_UNAVAILABLE,
            "unavailable",
        ),
        (
            ReadTimeoutError(endpoint_url="http://x"),
            TransientError,
            errors.STORAGE_UNAVAILABLE,
            "unavailable",
        ),
        (
            IncompleteReadError(actual_bytes=1, expected_bytes=2),
            TransientError,
            errors.STORAGE_UNAVAILABLE,
            "unavailable",
        ),
        (ProtocolError("Connection broken"), TransientError, errors.STORAGE_UNAVAILABLE, "unavailable"),
        (
            ParamValidationError(report="Invalid bucket name"),
            PermanentError,
            errors.OBJECT_NOT_FOUND,
            "invalid",
        ),
        (
            FileNotFoundError(2, "No such file or directory"),
            PermanentError,
            errors.OBJECT_NOT_FOUND,
            "no such",
        ),
        (IsADirectoryError(21, "Is a directory"), PermanentError, errors.OBJECT_NOT_FOUND, "no such"),
        (PermissionError(13, "Permission denied"), PermanentError, errors.ACCESS_DENIED, "permission"),
        (ConnectionResetError(104, "reset"), TransientError, errors.STORAGE_UNAVAILABLE, "reset"),
        (RuntimeError("bug"), PermanentError, errors.INTERNAL_ERROR, "bug"),
    ],
)
def test_classify_client_error(
    exc: BaseException, kind: type[SynthguardError], code: str, words: str
) -> None:
    ref = ObjectRef("bkt", "some/key.jpg")
    got = classify_client_error(exc, ref=ref)
    assert type(got) is kind
    assert got.code == code
    assert words in got.message
    assert got.message.startswith(ref.uri)
    assert classify_client_error(exc).code == code  # the ref only decorates


def test_classify_no_credentials_and_secrets() -> None:
    got = classify_client_error(NoCredentialsError())
    assert isinstance(got, ConfigError) and "AWS_ACCESS_KEY_ID" in got.message

    leaky = _client_error(
        "SignatureDoesNotMatch",
        403,
        "The request signature we calculated does not match",
        AWSAccessKeyId="AKIASECRETSECRET",
        StringToSign="AWS4-HMAC-SHA256 secret-material",
    )
    got = classify_client_error(leaky)
    assert isinstance(got, PermanentError) and got.code == errors.ACCESS_DENIED
    assert "AKIASECRETSECRET" not in got.message and "secret-material" not in got.message


def test_classify_delete_marker_and_passthrough() -> None:
    marker: Any = {
        "Error": {"Code": "MethodNotAllowed", "Message": "not allowed"},
        "ResponseMetadata": {"HTTPStatusCode": 405, "HTTPHeaders": {"x-amz-delete-marker": "true"}},
    }
    assert classify_client_error(ClientError(marker, "GetObject")).code == errors.OBJECT_NOT_FOUND
    already = TransientError("x", code=errors.STORAGE_UNAVAILABLE)
    assert classify_client_error(already) is already


# ------------------------------------------------------------------- local files


def _tree(root: Path) -> None:
    for rel, body in {
        "b.jpg": b"b",
        "a.png": b"a",
        "notes.txt": b"not an image",
        "sub/z.webp": b"z",
        "sub/deeper/y": b"y",
        ".hidden.jpg": b"h",
        ".cache/x.jpg": b"x",
        "sub/.DS_Store": b"d",
    }.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)


def test_iter_local_walks_sorted_and_skips_hidden(tmp_path: Path) -> None:
    _tree(tmp_path)
    keys = [ref.key for ref in iter_local([tmp_path])]
    assert keys == [
        str(tmp_path / rel) for rel in ("a.png", "b.jpg", "notes.txt", "sub/deeper/y", "sub/z.webp")
    ]
    assert all(ref.bucket is None and ref.is_local for ref in iter_local([tmp_path]))

    shallow = [ref.key for ref in iter_local([tmp_path], recursive=False)]
    assert shallow == [str(tmp_path / rel) for rel in ("a.png", "b.jpg", "notes.txt")]

    # Files given explicitly are taken as given (hidden or not), each once.
    given = [ref.key for ref in iter_local([tmp_path / ".hidden.jpg", tmp_path / "a.png", tmp_path])]
    assert given[:2] == [str(tmp_path / ".hidden.jpg"), str(tmp_path / "a.png")]
    assert len(given) == len(set(given)) == 6


def test_iter_local_missing_path(tmp_path: Path) -> None:
    (tmp_path / "ok.jpg").write_bytes(b"x")
    walker = iter_local([tmp_path / "ok.jpg", tmp_path / "nope"])
    with pytest.raises(PermanentError) as excinfo:
        next(walker)
    assert _code_of(excinfo) == errors.OBJECT_NOT_FOUND
    assert str(tmp_path / "nope") in excinfo.value.message


def test_fetch_local(make_storage: Callable[..., Storage], tmp_path: Path) -> None:
    storage = make_storage(None, max_image_bytes=10)
    (tmp_path / "small.bin").write_bytes(b"0123456789")
    (tmp_path / "big.bin").write_bytes(b"0123456789A")

    got = storage.fetch(ObjectRef(None, str(tmp_path / "small.bin")))
    assert (got.data, got.size, got.etag, got.version_id) == (b"0123456789", 10, None, None)
    assert got.sha256 == hashlib.sha256(b"0123456789").hexdigest()
    assert storage.head(ObjectRef(None, str(tmp_path / "small.bin"))) == (None, None)

    with pytest.raises(PermanentError) as too_big:
        storage.fetch(ObjectRef(None, str(tmp_path / "big.bin")))
    assert _code_of(too_big) == errors.OBJECT_TOO_LARGE and "11 bytes" in too_big.value.message

    for missing in (tmp_path / "absent.jpg", tmp_path):
        with pytest.raises(PermanentError) as excinfo:
            storage.fetch(ObjectRef(None, str(missing)))
        assert _code_of(excinfo) == errors.OBJECT_NOT_FOUND
        assert str(missing) in excinfo.value.message
