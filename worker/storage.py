"""Object access: S3 (or an S3-compatible store) and local files.

Every failure leaves this module as a :class:`~worker.errors.SynthguardError`
whose class decides the retry policy (see :func:`classify_client_error`).
botocore itself retries only a little ("standard" mode, few attempts): the
task layer above owns the real retry schedule, with backoff and jitter.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import boto3
import botocore.session
import urllib3.exceptions
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
    ResponseStreamingError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from worker.errors import (
    ACCESS_DENIED,
    INTERNAL_ERROR,
    OBJECT_NOT_FOUND,
    OBJECT_TOO_LARGE,
    STORAGE_UNAVAILABLE,
    ConfigError,
    PermanentError,
    SynthguardError,
    TransientError,
)
from worker.settings import Settings

if TYPE_CHECKING:
    from botocore.client import BaseClient

    from .s3_obstore import ObstoreFetcher

# Total attempts (first try included) botocore makes before handing a failure up.
DEFAULT_S3_MAX_ATTEMPTS = 3
# Bounded reads keep memory flat however large a lying or chunked body is.
_READ_CHUNK = 1024 * 1024
# Server-supplied error text is echoed into messages; keep it short.
_MAX_SERVER_MESSAGE = 200

# Exceptions a storage call may raise that classify_client_error understands.
_STORAGE_ERRORS: tuple[type[BaseException], ...] = (
    ClientError,
    BotoCoreError,
    urllib3.exceptions.HTTPError,
    OSError,
)


@dataclass(frozen=True)
class ObjectRef:
    """Where an object lives: an S3 object (optionally one version) or a local file."""

    bucket: str | None
    key: str
    version_id: str | None = None

    @property
    def uri(self) -> str:
        """``s3://bucket/key`` (with ``?versionId=`` when pinned), or the local path."""
        if self.bucket is None:
            return self.key
        uri = f"s3://{self.bucket}/{self.key}"
        return f"{uri}?versionId={self.version_id}" if self.version_id else uri

    @property
    def is_local(self) -> bool:
        return self.bucket is None


@dataclass(frozen=True)
class FetchedObject:
    """An object's bytes and the identity the store reported for them."""

    ref: ObjectRef
    data: bytes
    etag: str | None
    version_id: str | None
    size: int
    sha256: str


# ------------------------------------------------------------ reference rules

MAX_KEY_BYTES = 1024  # S3's own limit on an object key
MAX_VERSION_ID_LENGTH = 1024  # images.version_id
MAX_ETAG_LENGTH = 200  # images.etag
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# Names S3 reserves for access points, Object Lambda, Multi-Region Access Points and
# directory buckets: each makes botocore send the request somewhere else.
_RESERVED_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_BUCKET_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


def check_bucket_name(bucket: str) -> str:
    """``bucket`` if it follows S3's naming rules; else ``ValueError`` saying which one it breaks.

    No ARNs, no access-point aliases, no legacy names with capitals or
    underscores: botocore routes anything else (``arn:aws:s3:...``) to another
    endpoint, account or region, signed with the worker's credentials.
    """
    if bucket.startswith("arn:"):
        raise ValueError("bucket must be a bucket name, not an ARN (access points and Object Lambda are refused)")
    if not _BUCKET_NAME.fullmatch(bucket):
        raise ValueError(
            "bucket must be 3 to 63 characters of lowercase letters, digits, '.' and '-', "
            "starting and ending with a letter or digit"
        )
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        raise ValueError("bucket must not contain '..', '.-' or '-.'")
    try:
        ipaddress.IPv4Address(bucket)
    except ValueError:
        pass
    else:
        raise ValueError("bucket must not be formatted as an IP address")
    if bucket.startswith(_RESERVED_BUCKET_PREFIXES) or bucket.endswith(_RESERVED_BUCKET_SUFFIXES):
        raise ValueError("bucket uses a prefix or suffix S3 reserves (access points, Object Lambda, ...)")
    return bucket


def _check_key_text(key: str, what: str) -> None:
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode (a lone surrogate)") from None
    if size > MAX_KEY_BYTES:
        raise ValueError(f"{what} is {size} bytes as UTF-8; at most {MAX_KEY_BYTES} are allowed")
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in key):
        raise ValueError(f"{what} must not contain NUL or other control characters")
    if any(segment in (".", "..") for segment in key.split("/")):
        raise ValueError(f"{what} must not contain '.' or '..' path segments")


def check_object_key(key: str) -> str:
    """``key`` if it names one object: 1 to 1,024 bytes of UTF-8, no control characters, no dot segments."""
    if not key:
        raise ValueError("key must not be empty")
    _check_key_text(key, "key")
    if key.endswith("/"):
        raise ValueError("key ends with '/': that names a folder, not an object")
    return key


def check_key_prefix(prefix: str) -> str:
    """``prefix`` (possibly empty, possibly ending in '/') under the same rules as a key."""
    if prefix:
        _check_key_text(prefix, "prefix")
    return prefix


def check_version_id(version_id: str) -> str:
    """A version id that fits its column and carries no control characters."""
    if not version_id or len(version_id) > MAX_VERSION_ID_LENGTH:
        raise ValueError(f"version_id must be 1 to {MAX_VERSION_ID_LENGTH} characters")
    if not version_id.isprintable():
        raise ValueError("version_id must not contain control characters")
    return version_id


def check_ref(ref: ObjectRef) -> ObjectRef:
    """``ref`` if it is a well-formed S3 object reference (bucket, key, version id)."""
    if ref.bucket is None:
        raise ValueError(f"{ref.key!r} is not an S3 object (s3://bucket/key)")
    check_bucket_name(ref.bucket)
    check_object_key(ref.key)
    if ref.version_id is not None:
        check_version_id(ref.version_id)
    return ref


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into ``(bucket, prefix)``; the prefix may be empty."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.lower() != "s3":
        raise ValueError(f"not an S3 URI (expected s3://bucket/prefix): {uri!r}")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"S3 URI has no bucket name (expected s3://bucket/prefix): {uri!r}")
    if any(ch.isspace() for ch in bucket):
        raise ValueError(f"S3 bucket name contains whitespace: {uri!r}")
    return bucket, prefix


# ---------------------------------------------------------------- classification

_NOT_FOUND_CODES = {
    "NoSuchKey": "no such key",
    "NoSuchBucket": "no such bucket",
    "NoSuchVersion": "no such version",
    "NotFound": "not found",
    "404": "not found",
}
_DENIED_CODES = {
    "AccessDenied": "access denied",
    "403": "access denied",
    "Forbidden": "access denied",
    "AllAccessDisabled": "all access to this object has been disabled",
    "InvalidObjectState": "object is archived (e.g. Glacier) and must be restored before it can be read",
    "InvalidAccessKeyId": "the store does not know the configured access key id",
    "SignatureDoesNotMatch": "the store rejected the request signature (check the secret key)",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is invalid",
    "AccountProblem": "the account is not in good standing",
    "PermanentRedirect": "the bucket lives in another region or behind another endpoint",
}
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "ProvisionedThroughputExceededException",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "TemporaryRedirect",
        "RequestTimeTooSkewed",
        "500",
        "502",
        "503",
        "504",
    }
)


def _status_of(exc: ClientError) -> int | None:
    meta = exc.response.get("ResponseMetadata") or {}
    status = meta.get("HTTPStatusCode")
    if isinstance(status, int):
        return status
    code = str((exc.response.get("Error") or {}).get("Code", ""))
    return int(code) if code.isdigit() else None


def _is_delete_marker(exc: ClientError) -> bool:
    headers = (exc.response.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}
    return str(headers.get("x-amz-delete-marker", "")).lower() == "true"


def _classify_s3(exc: ClientError, where: str, version_pinned: bool) -> SynthguardError:
    error = exc.response.get("Error") or {}
    code = str(error.get("Code") or "")
    # Only Code and Message are echoed: other fields of an S3 error body (e.g.
    # AWSAccessKeyId, StringToSign on SignatureDoesNotMatch) must never reach logs.
    server_message = str(error.get("Message") or "")[:_MAX_SERVER_MESSAGE]
    status = _status_of(exc)
    label = code or f"HTTP {status}"
    detail = f"{label}: {server_message}" if server_message else label

    if code in _NOT_FOUND_CODES:
        what = _NOT_FOUND_CODES[code]
        if what == "not found":
            # HEAD answers carry no body, so a 404 cannot tell bucket, key and version apart.
            suspects = "bucket, key or version" if version_pinned else "bucket or key"
            what = f"not found (no such {suspects})"
        return PermanentError(f"{where}{what} ({detail})", code=OBJECT_NOT_FOUND)
    if code == "InvalidArgument":
        argument = str(error.get("ArgumentName") or "").lower()
        if argument == "versionid" or "version id" in server_message.lower():
            return PermanentError(f"{where}invalid version id ({detail})", code=OBJECT_NOT_FOUND)
    if code == "MethodNotAllowed" and _is_delete_marker(exc):
        return PermanentError(f"{where}this version is a delete marker ({detail})", code=OBJECT_NOT_FOUND)
    if code in _DENIED_CODES:
        return PermanentError(f"{where}{_DENIED_CODES[code]} ({detail})", code=ACCESS_DENIED)
    if code in _TRANSIENT_CODES:
        return TransientError(f"{where}storage unavailable ({detail})", code=STORAGE_UNAVAILABLE)

    if status in (404, 410):
        return PermanentError(f"{where}not found ({detail})", code=OBJECT_NOT_FOUND)
    if status in (408, 429):
        return TransientError(f"{where}storage unavailable ({detail})", code=STORAGE_UNAVAILABLE)
    if status is not None and 400 <= status < 500:
        # No better code exists for "the store refuses this request for good".
        return PermanentError(f"{where}request rejected by the store ({detail})", code=ACCESS_DENIED)
    return TransientError(f"{where}storage unavailable ({detail})", code=STORAGE_UNAVAILABLE)


CREDENTIALS_HELP = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary "
    "credentials), or AWS_PROFILE, or give the host an IAM role"
)


def classify_client_error(exc: BaseException, *, ref: ObjectRef | None = None) -> SynthguardError:
    """Map a storage-layer exception to the error class and code that decide its fate.

    ``ref`` only makes the message specific (its URI is prepended); the
    classification depends on ``exc`` alone.
    """
    if isinstance(exc, SynthguardError):
        return exc
    where = f"{ref.uri}: " if ref is not None else ""
    version_pinned = ref is not None and ref.version_id is not None

    if isinstance(exc, ClientError):
        return _classify_s3(exc, where, version_pinned)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return ConfigError(f"{where}no usable AWS credentials ({exc}); {CREDENTIALS_HELP}")
    if isinstance(exc, NoRegionError):
        return ConfigError(f"{where}no AWS region configured; set AWS_DEFAULT_REGION or AWS_REGION")
    if isinstance(exc, ParamValidationError):
        # botocore refuses malformed bucket names before sending anything.
        return PermanentError(f"{where}invalid bucket or key ({exc})", code=OBJECT_NOT_FOUND)
    if isinstance(
        exc,
        (
            BotoConnectionError,
            HTTPClientError,
            IncompleteReadError,
            ResponseStreamingError,
            urllib3.exceptions.HTTPError,
        ),
    ):
        return TransientError(
            f"{where}storage unavailable ({type(exc).__name__}: {exc})", code=STORAGE_UNAVAILABLE
        )
    if isinstance(exc, BotoCoreError):
        # e.g. a checksum mismatch in transit or a credential provider timing out.
        return TransientError(f"{where}storage error ({type(exc).__name__}: {exc})", code=STORAGE_UNAVAILABLE)

    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return PermanentError(f"{where}no such file ({exc.strerror or exc})", code=OBJECT_NOT_FOUND)
    if isinstance(exc, PermissionError):
        return PermanentError(f"{where}permission denied ({exc.strerror or exc})", code=ACCESS_DENIED)
    if isinstance(exc, OSError):
        # Sockets reset, NFS hiccups, EIO: worth another attempt.
        return TransientError(f"{where}I/O error ({type(exc).__name__}: {exc})", code=STORAGE_UNAVAILABLE)
    return PermanentError(f"{where}unexpected error ({type(exc).__name__}: {exc})", code=INTERNAL_ERROR)


# ----------------------------------------------------------------------- reading


class _Readable(Protocol):
    def read(self, amt: int | None = ...) -> bytes: ...


def _too_large(ref: ObjectRef, cap: int, size: int | None) -> PermanentError:
    amount = f"{size} bytes" if size is not None else f"more than {cap} bytes"
    return PermanentError(
        f"{ref.uri}: object is {amount}, over the cap of {cap} bytes (max_image_bytes)",
        code=OBJECT_TOO_LARGE,
    )


def _read_capped(stream: _Readable, ref: ObjectRef, cap: int) -> bytes:
    """Read to EOF but never more than ``cap + 1`` bytes; over the cap is an error."""
    chunks: list[bytes] = []
    received = 0
    while True:
        # Reading until an empty chunk (not just cap+1) lets botocore verify
        # Content-Length and any response checksum at EOF.
        chunk = stream.read(min(_READ_CHUNK, cap + 1 - received))
        if not chunk:
            break
        chunks.append(chunk)
        received += len(chunk)
        if received > cap:
            raise _too_large(ref, cap, None)
    return b"".join(chunks)


def _strip_etag(etag: Any) -> str | None:
    return str(etag).strip('"') if etag else None


def _fetched(ref: ObjectRef, data: bytes, etag: str | None, version_id: str | None) -> FetchedObject:
    return FetchedObject(
        ref=ref,
        data=data,
        etag=etag,
        version_id=version_id,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


class Storage:
    """Fetches, lists and inspects objects; one shared boto3 client, safe across threads.

    With ``SYNTHGUARD_S3_CLIENT=obstore`` S3 objects are fetched through obstore
    (:mod:`worker.s3_obstore`), with the same caps, identity and error codes.
    """

    def __init__(self, settings: Settings, *, max_pool_connections: int | None = None) -> None:
        if max_pool_connections is not None and max_pool_connections < 1:
            raise ValueError("max_pool_connections must be at least 1")
        self._settings = settings
        self._pool = max_pool_connections or max(10, 2 * settings.concurrency)
        self._client: BaseClient | None = None
        self._obstore: ObstoreFetcher | None = None
        self._lock = threading.Lock()
        if settings.s3_client == "obstore":
            from .s3_obstore import require_obstore

            require_obstore()  # a worker without the package refuses to start, rather than fail images

    @property
    def client(self) -> BaseClient:
        """The S3 client, created on first use (sessions are not thread-safe; clients are)."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
                client = self._client
        return client

    def _make_client(self) -> BaseClient:
        core = botocore.session.Session()
        retries: dict[str, Any] = {"mode": "standard"}
        # AWS_MAX_ATTEMPTS (or max_attempts in the AWS config file) wins over our default.
        if core.get_config_variable("max_attempts") is None:
            retries["total_max_attempts"] = DEFAULT_S3_MAX_ATTEMPTS
        s3_options: dict[str, Any] | None = None
        configured_s3 = core.get_config_variable("s3") or {}
        if self._settings.s3_endpoint_url and "addressing_style" not in configured_s3:
            # Self-hosted S3-compatible stores rarely resolve bucket.host names.
            s3_options = {"addressing_style": "path"}
        config = Config(
            max_pool_connections=self._pool,
            connect_timeout=self._settings.s3_connect_timeout_s,
            read_timeout=self._settings.s3_read_timeout_s,
            retries=retries,
            s3=s3_options,
        )
        session = boto3.session.Session(botocore_session=core)
        return session.client("s3", endpoint_url=self._settings.s3_endpoint_url, config=config)

    def close(self) -> None:
        """Drop pooled connections; a later call builds a new client."""
        with self._lock:
            client, self._client = self._client, None
            fetcher, self._obstore = self._obstore, None
        if client is not None:
            client.close()
        if fetcher is not None:
            fetcher.close()

    # ------------------------------------------------------------------- fetch

    def fetch(self, ref: ObjectRef) -> FetchedObject:
        """The object's bytes, at most ``settings.max_image_bytes`` of them."""
        if ref.is_local:
            return self._fetch_local(ref)
        return self._fetch_s3(ref)

    def _fetch_s3(self, ref: ObjectRef) -> FetchedObject:
        if self._settings.s3_client == "obstore":
            return self._fetch_obstore(ref)
        cap = self._settings.max_image_bytes
        params: dict[str, str] = {"Bucket": str(ref.bucket), "Key": ref.key}
        if ref.version_id:
            params["VersionId"] = ref.version_id
        try:
            response = self.client.get_object(**params)
        except _STORAGE_ERRORS as exc:
            raise classify_client_error(exc, ref=ref) from exc
        body = response["Body"]
        try:
            declared = response.get("ContentLength")
            if declared is not None and declared > cap:
                # Closing unread drops the connection instead of draining it.
                raise _too_large(ref, cap, int(declared))
            data = _read_capped(body, ref, cap)
        except _STORAGE_ERRORS as exc:
            raise classify_client_error(exc, ref=ref) from exc
        finally:
            body.close()
        return _fetched(ref, data, _strip_etag(response.get("ETag")), response.get("VersionId"))

    def _fetch_obstore(self, ref: ObjectRef) -> FetchedObject:
        from .s3_obstore import ObstoreFetcher, answer_of, raised_errors, unavailable

        cap = self._settings.max_image_bytes
        fetcher = self._obstore
        if fetcher is None:
            with self._lock:
                if self._obstore is None:
                    self._obstore = ObstoreFetcher(
                        self._settings, default_attempts=DEFAULT_S3_MAX_ATTEMPTS, read_chunk=_READ_CHUNK
                    )
                fetcher = self._obstore
        try:
            body, meta = fetcher.get(str(ref.bucket), ref.key, ref.version_id)
            declared = meta.get("size")
            if declared is not None and declared > cap:
                raise _too_large(ref, cap, int(declared))
            data = _read_capped(body, ref, cap)
        except raised_errors() as exc:
            where = f"{ref.uri}: "
            answer = answer_of(exc)
            # "from None": obstore's text quotes the whole error body (on SignatureDoesNotMatch, the
            # access key id and the string signed), and a logged traceback would print it.
            if answer is None:
                raise unavailable(exc, where) from None
            raise _classify_s3(answer, where, ref.version_id is not None) from None
        return _fetched(ref, data, _strip_etag(meta.get("e_tag")), meta.get("version"))

    def _fetch_local(self, ref: ObjectRef) -> FetchedObject:
        cap = self._settings.max_image_bytes
        try:
            info = os.stat(ref.key)
            if not stat.S_ISREG(info.st_mode):
                # Directories, FIFOs and devices: opening a FIFO would block forever.
                raise PermanentError(f"{ref.uri}: not a regular file", code=OBJECT_NOT_FOUND)
            if info.st_size > cap:
                raise _too_large(ref, cap, info.st_size)
            with open(ref.key, "rb") as handle:
                # The file may have grown since stat.
                data = handle.read(cap + 1)
        except OSError as exc:
            raise classify_client_error(exc, ref=ref) from exc
        if len(data) > cap:
            raise _too_large(ref, cap, None)
        return _fetched(ref, data, None, None)

    # -------------------------------------------------------------- head, list

    def head(self, ref: ObjectRef) -> tuple[str | None, str | None]:
        """``(etag, version_id)`` without reading the body; local files give ``(None, None)``."""
        if ref.is_local:
            try:
                info = os.stat(ref.key)
            except OSError as exc:
                raise classify_client_error(exc, ref=ref) from exc
            if not stat.S_ISREG(info.st_mode):
                raise PermanentError(f"{ref.uri}: not a regular file", code=OBJECT_NOT_FOUND)
            return None, None
        params: dict[str, str] = {"Bucket": str(ref.bucket), "Key": ref.key}
        if ref.version_id:
            params["VersionId"] = ref.version_id
        try:
            response = self.client.head_object(**params)
        except _STORAGE_ERRORS as exc:
            raise classify_client_error(exc, ref=ref) from exc
        return _strip_etag(response.get("ETag")), response.get("VersionId")

    def list_prefix(self, bucket: str, prefix: str = "", *, page_size: int = 1000) -> Iterator[ObjectRef]:
        """Every object under ``prefix`` in key order, directory markers (``.../``) skipped."""
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        where = ObjectRef(bucket, prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size})
        try:
            for page in pages:
                for item in page.get("Contents", ()):
                    key = item["Key"]
                    if not key.endswith("/"):
                        yield ObjectRef(bucket, key)
        except _STORAGE_ERRORS as exc:
            raise classify_client_error(exc, ref=where) from exc


# -------------------------------------------------------------------- local files


def _walk(directory: str, recursive: bool) -> Iterator[str]:
    with os.scandir(directory) as entries:
        ordered = sorted(entries, key=lambda entry: entry.name)
    for entry in ordered:
        if entry.name.startswith("."):
            continue
        # Symlinked directories are not followed: a link cycle must not hang a scan.
        if entry.is_dir(follow_symlinks=False):
            if recursive:
                yield from _walk(entry.path, recursive)
        elif entry.is_file() or entry.is_symlink():
            # A dangling link is yielded so that its fetch fails visibly.
            yield entry.path


def iter_local(paths: Sequence[str | Path], *, recursive: bool = True) -> Iterator[ObjectRef]:
    """Local files as refs: files as given, directories walked in sorted order.

    Hidden entries inside directories are skipped; extensions are ignored
    (formats are sniffed from bytes later). Every path is checked before the
    first ref is yielded, so a typo fails the scan before any work starts.
    """
    absolute = [os.path.abspath(os.fspath(path)) for path in paths]
    for path in absolute:
        if not os.path.lexists(path):
            raise PermanentError(f"{path}: no such file or directory", code=OBJECT_NOT_FOUND)
    seen: set[str] = set()
    for path in absolute:
        files = _walk(path, recursive) if os.path.isdir(path) else iter((path,))
        try:
            for file in files:
                if file not in seen:
                    seen.add(file)
                    yield ObjectRef(None, file)
        except OSError as exc:
            # e.g. an unreadable subdirectory: say which one, in our own terms.
            raise classify_client_error(exc, ref=ObjectRef(None, exc.filename or path)) from exc
