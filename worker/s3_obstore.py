"""S3 GETs through obstore (Rust ``object_store``): the opt-in fetch that costs a fraction of botocore's CPU.

``SYNTHGUARD_S3_CLIENT=obstore`` sends :meth:`worker.storage.Storage.fetch` of S3
objects here (bench/RESULTS.md, "CPU per S3 GET": 0.28 ms against botocore's 1.65
per 200 KB GET). HEAD, listing and backfills stay on boto3. The rules are
botocore's: credentials from botocore's own chain (environment, profile, SSO,
instance role, web identity: obstore asks boto3 for them), ``AWS_MAX_ATTEMPTS``,
the endpoint and addressing style, the size cap from the declared size and again
while reading, ETag and version id, and the same error codes. obstore reports
S3's answer only as text: its status, ``Code`` and ``Message`` are read out of
it, and nothing else of that text is kept, since the rest quotes the request.
Not kept from botocore: response checksums (obstore checks none).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import boto3
import botocore.session
from botocore.exceptions import ClientError

from .errors import ConfigError, TransientError
from .settings import Settings

if TYPE_CHECKING:
    from obstore.store import S3Store

# S3's answer inside obstore's error text.
_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([^<]{1,100})</Code>")
_MESSAGE = re.compile(r"<Message>([^<]{0,500})</Message>")


def answer_of(exc: BaseException) -> ClientError | None:
    """The S3 error answer an obstore error carries, as botocore raises it; None when there was none."""
    text = str(exc)
    status = _STATUS.search(text)
    if status is None:
        return None
    code = _CODE.search(text)
    message = _MESSAGE.search(text)
    response: Any = {
        "Error": {"Code": code[1] if code else "", "Message": message[1] if message else ""},
        "ResponseMetadata": {"HTTPStatusCode": int(status[1]), "HTTPHeaders": {}},
    }
    return ClientError(response, "GetObject")


def raised_errors() -> tuple[type[BaseException], ...]:
    """What obstore raises: its own classes, and the builtin ones it maps 404, 403 and I/O to."""
    from obstore.exceptions import BaseError

    return (BaseError, OSError)


_URL = re.compile(r"https?://\S+")


def unavailable(exc: BaseException, where: str) -> TransientError:
    """An obstore failure without an S3 answer: no connection, a timeout, a broken response."""
    from .errors import STORAGE_UNAVAILABLE

    # The first line only, without URLs: the rest is obstore's retry history, which quotes the request.
    first = _URL.sub("<url>", str(exc).split("\n", 1)[0])[:200]
    return TransientError(
        f"{where}storage unavailable ({type(exc).__name__}: {first})", code=STORAGE_UNAVAILABLE
    )


class _ChunkReader:
    """``read(n)`` over an iterator of byte chunks, for the capped reader storage already has."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._pending = b""

    def read(self, amt: int | None = None) -> bytes:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._pending = bytes(chunk)
        if amt is None:
            out, self._pending = self._pending, b""
        else:
            out, self._pending = self._pending[:amt], self._pending[amt:]
        return out


def require_obstore() -> None:
    """Raise ConfigError unless the obstore package is installed (checked where Storage is built)."""
    try:
        import obstore  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "SYNTHGUARD_S3_CLIENT=obstore needs the obstore package: pip install 'synthguard[obstore]'"
        ) from exc


class ObstoreFetcher:
    """One obstore store per bucket, built on first use; safe across threads."""

    def __init__(self, settings: Settings, *, default_attempts: int, read_chunk: int) -> None:
        self._settings = settings
        self._default_attempts = default_attempts
        self._read_chunk = read_chunk
        self._stores: dict[str, S3Store] = {}
        self._lock = threading.Lock()

    def get(self, bucket: str, key: str, version_id: str | None) -> tuple[_ChunkReader, dict[str, Any]]:
        """The object's body, to read, and its meta (``size`` as declared, ``e_tag``, ``version``).

        obstore's exceptions pass through: the caller maps them (:func:`answer_of`).
        """
        import obstore

        options: Any = {"version": version_id} if version_id else None
        result = obstore.get(self._store(bucket), key, options=options)
        return _ChunkReader(result.stream(min_chunk_size=self._read_chunk)), dict(result.meta)

    def close(self) -> None:
        with self._lock:
            self._stores.clear()

    def _store(self, bucket: str) -> S3Store:
        store = self._stores.get(bucket)
        if store is None:
            with self._lock:
                store = self._stores.get(bucket)
                if store is None:
                    store = self._stores[bucket] = self._make_store(bucket)
        return store

    def _make_store(self, bucket: str) -> S3Store:
        from obstore.auth.boto3 import Boto3CredentialProvider
        from obstore.store import S3Store

        from .storage import CREDENTIALS_HELP

        core = botocore.session.Session()
        # obstore would only fail at the first GET, with a message of its own: say it as botocore does.
        if core.get_credentials() is None:
            raise ConfigError(f"no usable AWS credentials; {CREDENTIALS_HELP}")
        region = core.get_config_variable("region")
        if not region:
            raise ConfigError("no AWS region configured; set AWS_DEFAULT_REGION or AWS_REGION")
        attempts = int(core.get_config_variable("max_attempts") or self._default_attempts)
        endpoint = self._settings.s3_endpoint_url
        client: Any = {
            "connect_timeout": timedelta(seconds=self._settings.s3_connect_timeout_s),
            "read_timeout": timedelta(seconds=self._settings.s3_read_timeout_s),
            # obstore's default caps the whole request at 30 s; the read timeout is what botocore has.
            "timeout": timedelta(hours=1),
            "allow_http": bool(endpoint and endpoint.startswith("http://")),
        }
        return S3Store(
            bucket,
            endpoint=endpoint,
            region=region,
            # As botocore: virtual-hosted on AWS, path style on a self-hosted endpoint.
            virtual_hosted_style_request=endpoint is None,
            client_options=client,
            retry_config={"max_retries": max(0, attempts - 1)},
            # Asked again every 5 minutes: botocore refreshes temporary credentials well before they
            # expire, and the provider's default (30 minutes) can outlive a short role session.
            credential_provider=Boto3CredentialProvider(
                boto3.session.Session(botocore_session=core), ttl=timedelta(minutes=5)
            ),
        )
