"""Request and response bodies of the HTTP API, with the documentation OpenAPI shows."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, TypeGuard
from urllib.parse import unquote_plus

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from worker.models import as_utc
from worker.sanitise import first_unsafe
from worker.storage import (
    MAX_ETAG_LENGTH,
    MAX_KEY_BYTES,
    MAX_VERSION_ID_LENGTH,
    check_bucket_name,
    check_object_key,
    check_version_id,
)

MAX_OBJECTS = 1000
MAX_EVENT_RECORDS = 1000
MAX_METADATA_BYTES = 4096
# Deeper metadata is refused (422) before it is walked or stored.
MAX_JSON_DEPTH = 32
MAX_URL_LENGTH = 2048

EXAMPLE_SCAN_ID = "8a4f3c0e-4b7e-4f0f-9a63-1f7d0c2b9e11"
EXAMPLE_IMAGE_ID = "0d9c7a2e-5a61-4f3b-8e0e-3c2b1a9f8d77"
EXAMPLE_CLIENT_ID = "5b1d2e3f-0a9c-4c1e-b7d8-6e5f4a3b2c1d"

UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]


# ------------------------------------------------------------------ problems


class FieldError(BaseModel):
    """One field that failed validation."""

    loc: list[str | int] = Field(
        description="Where the error is: `body`, `query` or `path`, then field names and list indexes.",
        examples=[["body", "objects", 0, "key"]],
    )
    msg: str = Field(
        description="What is wrong, in words.", examples=["String should have at least 1 character"]
    )
    type: str = Field(
        description="Pydantic's error type, stable enough to branch on.", examples=["string_too_short"]
    )


class Problem(BaseModel):
    """An error, as RFC 9457 problem details (`application/problem+json`)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(
        description="Identifies the kind of problem: `urn:synthguard:problem:<name>`, or `about:blank` "
        "when the status code says it all.",
        examples=["urn:synthguard:problem:rate-limited"],
    )
    title: str = Field(description="A short summary of the kind of problem.", examples=["Too Many Requests"])
    status: int = Field(description="The HTTP status code.", examples=[429])
    detail: str = Field(
        description="What went wrong with this request, in words.",
        examples=["This API key made more than 600 requests this minute; retry in 17 s."],
    )
    instance: str | None = Field(
        None, description="The request path the problem occurred on.", examples=["/v1/scans"]
    )


class ValidationProblem(Problem):
    """A 422 problem: which fields were invalid."""

    errors: list[FieldError] = Field(default_factory=list, description="Each invalid field and why.")


# --------------------------------------------------------------------- scans


class ObjectIn(BaseModel):
    """One S3 object to score."""

    model_config = ConfigDict(extra="forbid")

    bucket: str = Field(
        min_length=1,
        max_length=255,
        description="Bucket name, by S3's naming rules: 3 to 63 lowercase letters, digits, '.' and '-'. "
        "ARNs, access points and Object Lambda aliases are refused.",
        examples=["uploads"],
    )
    key: str = Field(
        min_length=1,
        description=f"Object key, not URL-encoded; at most {MAX_KEY_BYTES} bytes as UTF-8, no control "
        "characters, no '.' or '..' path segments, and not a 'folder' (ending in '/').",
        examples=["2026/05/avatar-123.jpg"],
    )
    version_id: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_VERSION_ID_LENGTH,
        description="A specific version of a versioned object; omitted: the latest version when fetched.",
        examples=["3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY"],
    )

    @field_validator("bucket")
    @classmethod
    def _check_bucket(cls, bucket: str) -> str:
        return check_bucket_name(bucket)

    @field_validator("key")
    @classmethod
    def _check_key(cls, key: str) -> str:
        return check_object_key(key)

    @field_validator("version_id")
    @classmethod
    def _check_version_id(cls, version_id: str | None) -> str | None:
        return None if version_id is None else check_version_id(version_id)


def _check_json_text(value: Any, path: str, depth: int = 0) -> None:
    """Every key and string of a JSON value is text the database stores: no NUL, control
    characters (but tab and newlines) or lone surrogates; the error names where."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{path} is nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        if (found := first_unsafe(value)) is not None:
            raise ValueError(f"{path} contains {found}")
    elif isinstance(value, dict):
        for key, item in value.items():
            if (found := first_unsafe(str(key))) is not None:
                raise ValueError(f"a key of {path} contains {found}")
            _check_json_text(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_text(item, f"{path}[{index}]", depth + 1)


def check_idempotency_key(key: str) -> str:
    if (found := first_unsafe(key)) is not None:
        raise ValueError(f"idempotency_key contains {found}")
    return key


class ScanRequest(BaseModel):
    """A request to score S3 objects."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "objects": [
                        {"bucket": "uploads", "key": "2026/05/avatar-123.jpg"},
                        {
                            "bucket": "uploads",
                            "key": "2026/05/id-front.png",
                            "version_id": "3HL4kqtJlcpXroDTD",
                        },
                    ],
                    "priority": "realtime",
                    "threshold": 0.8,
                    "callback_url": "https://hooks.example.com/synthguard",
                    "metadata": {"user_id": "u_42", "flow": "kyc"},
                    "idempotency_key": "upload-7f3a9",
                }
            ]
        },
    )

    objects: list[ObjectIn] = Field(
        min_length=1,
        max_length=MAX_OBJECTS,
        description=f"The objects to score, 1 to {MAX_OBJECTS} (more: 413). The same object listed twice "
        "is scored once; both entries of the answer carry its id.",
    )
    priority: Literal["realtime", "bulk"] = Field(
        "realtime",
        description="`realtime` (uploads, KYC: served first) or `bulk` (backfills: served when realtime "
        "work is idle). Realtime images past the client's burst (SYNTHGUARD_REALTIME_BURST queued or "
        "processing, 32 by default) wait behind other clients' realtime images.",
    )
    threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Flag an image when p(synthetic) >= threshold. Omitted: the client's default, else the "
        "server's (SYNTHGUARD_THRESHOLD).",
        examples=[0.8],
    )
    callback_url: str | None = Field(
        None,
        max_length=MAX_URL_LENGTH,
        description="Where to POST signed webhooks (`image.flagged`, `scan.completed`) for this scan. "
        "Must be https (plain http only where the operator allows it), on port 443 (80 for http) unless "
        "the operator allows the network, with no credentials and no blocked address; one rule "
        "(worker.webhooks.URLPolicy) checks it here and again at every send.",
        examples=["https://hooks.example.com/synthguard"],
    )
    webhook_events: list[Literal["image.flagged", "scan.completed"]] | None = Field(
        None,
        description="Webhook events this scan sends to `callback_url` (or the client's webhook URL): "
        "`image.flagged` for each flagged image, `scan.completed` once every image is terminal. "
        "Omitted: `image.flagged` only.",
        examples=[["image.flagged", "scan.completed"]],
    )
    metadata: dict[str, Any] | None = Field(
        None,
        description=f"Your own JSON object, stored with the scan and sent back in webhooks; at most "
        f"{MAX_METADATA_BYTES} bytes as compact JSON.",
        examples=[{"user_id": "u_42", "flow": "kyc"}],
    )
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Makes retries safe: the same key with the same request answers with the first scan "
        "(no new images); the same key with a different request is refused (422). May also be sent as "
        "the `Idempotency-Key` header.",
        examples=["upload-7f3a9"],
    )

    @field_validator("idempotency_key")
    @classmethod
    def _check_idempotency_key(cls, key: str | None) -> str | None:
        return None if key is None else check_idempotency_key(key)

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, metadata: dict[str, Any] | None) -> dict[str, Any] | None:
        if metadata is not None:
            _check_json_text(metadata, "metadata")
            try:
                text = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
            except ValueError:
                raise ValueError("metadata must be plain JSON: NaN and Infinity are not allowed") from None
            size = len(text.encode())
            if size > MAX_METADATA_BYTES:
                raise ValueError(
                    f"metadata is {size} bytes as JSON; at most {MAX_METADATA_BYTES} are allowed"
                )
        return metadata


class ImageRef(BaseModel):
    """An image queued for scoring."""

    id: uuid.UUID = Field(description="The image's id: `GET /v1/images/{id}`.", examples=[EXAMPLE_IMAGE_ID])
    bucket: str = Field(description="Bucket name.", examples=["uploads"])
    key: str = Field(description="Object key.", examples=["2026/05/avatar-123.jpg"])
    version_id: str | None = Field(None, description="Object version, when one was given.", examples=[None])


class ScanAccepted(BaseModel):
    """A scan was accepted: its images are queued."""

    id: uuid.UUID = Field(description="The scan's id.", examples=[EXAMPLE_SCAN_ID])
    status_url: str = Field(
        description="Where to read the scan's progress and results.",
        examples=[f"https://synthguard.example.com/v1/scans/{EXAMPLE_SCAN_ID}"],
    )
    priority: Literal["realtime", "bulk"] = Field(description="The lane the images were queued on.")
    images: list[ImageRef] = Field(description="One entry per requested object, in request order.")


class ScanCounts(BaseModel):
    """How many of a scan's images are in each state."""

    queued: int = Field(description="Waiting for a worker.", examples=[3])
    processing: int = Field(description="Being fetched, decoded or scored.", examples=[1])
    done: int = Field(description="Scored.", examples=[6])
    failed: int = Field(description="Could not be scored; see each image's `error_code`.", examples=[0])
    flagged: int = Field(description="Scored and at or over their threshold.", examples=[2])


class ImageOut(BaseModel):
    """One image: where it is, its state and, once done, its score."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID = Field(description="The image's id.", examples=[EXAMPLE_IMAGE_ID])
    bucket: str | None = Field(description="Bucket name.", examples=["uploads"])
    key: str = Field(description="Object key.", examples=["2026/05/avatar-123.jpg"])
    version_id: str | None = Field(
        description="Object version: as requested, or as fetched.", examples=[None]
    )
    etag: str | None = Field(
        description="ETag of the bytes scored (set when fetched).",
        examples=["9b2cf535f27731c974343645a3985328"],
    )
    state: Literal["queued", "processing", "done", "failed"] = Field(
        description="`queued`, `processing`, `done` (scored) or `failed` (see `error_code`)."
    )
    score: float | None = Field(
        description="p(synthetic) from 0 to 1: how likely the image was AI-generated. Null unless done.",
        examples=[0.93],
    )
    flagged: bool | None = Field(description="`score >= threshold`; null unless done.", examples=[True])
    threshold: float = Field(description="The flag threshold this image was judged by.", examples=[0.8])
    model_name: str | None = Field(
        description="Model architecture that scored it.", examples=["tf_mobilenetv3_large_100"]
    )
    model_version: str | None = Field(
        description="`sha256:` and the first 12 hex digits of the weights' hash.",
        examples=["sha256:1a2b3c4d5e6f"],
    )
    provenance: dict[str, Any] | None = Field(
        description="Provenance signals read from the file (C2PA, EXIF, generator tags).", examples=[None]
    )
    error_code: str | None = Field(
        description="Why the image could not be scored (`object_not_found`, `corrupt_image`, ...); null "
        "unless failed or retrying.",
        examples=[None],
    )
    error_message: str | None = Field(description="The error in words.", examples=[None])
    attempts: int = Field(description="How many times scoring was attempted.", examples=[1])
    created_at: UtcDatetime = Field(description="When the image was queued (UTC).")
    completed_at: UtcDatetime | None = Field(description="When it reached `done` or `failed` (UTC).")


class ImageDetail(ImageOut):
    """One image, with the scan it belongs to."""

    scan_id: uuid.UUID = Field(description="The scan this image belongs to.", examples=[EXAMPLE_SCAN_ID])


class ScanOut(BaseModel):
    """A scan: its progress, and each image's state and result."""

    id: uuid.UUID = Field(description="The scan's id.", examples=[EXAMPLE_SCAN_ID])
    state: Literal["queued", "processing", "completed"] = Field(
        description="`queued` (no image started), `processing` (some started, some not yet final) or "
        "`completed` (every image done or failed)."
    )
    priority: Literal["realtime", "bulk"] = Field(description="The lane its images were queued on.")
    threshold: float | None = Field(
        description="The threshold the request asked for, if any.", examples=[0.8]
    )
    callback_url: str | None = Field(description="Where webhooks for this scan go, if set.", examples=[None])
    metadata: dict[str, Any] | None = Field(
        description="The metadata sent with the request.", examples=[{"flow": "kyc"}]
    )
    created_at: UtcDatetime = Field(description="When the scan was accepted (UTC).")
    completed_at: UtcDatetime | None = Field(description="When its last image became final (UTC).")
    image_count: int = Field(
        description="How many images the scan has (`images` may be one page of them).", examples=[10]
    )
    counts: ScanCounts = Field(description="Images per state, over the whole scan.")
    images: list[ImageOut] = Field(
        description="The scan's images, ordered by bucket, key and version; paged by `limit` and `offset`."
    )


# ---------------------------------------------------------------- S3 events


class S3Bucket(BaseModel):
    """The bucket of an S3 event record."""

    model_config = ConfigDict(extra="ignore")

    name: str | None = Field(None, description="Bucket name.", examples=["uploads"])


class S3Object(BaseModel):
    """The object of an S3 event record."""

    model_config = ConfigDict(extra="ignore")

    key: str | None = Field(
        None,
        description="Object key, URL-encoded as stores send it ('+' for space).",
        examples=["photos/my+summer%C3%A9.jpg"],
    )
    size: int | None = Field(None, description="Object size in bytes.", examples=[48213])
    eTag: str | None = Field(
        None, description="The object's ETag.", examples=["9b2cf535f27731c974343645a3985328"]
    )
    versionId: str | None = Field(None, description="Version id, on versioned buckets.", examples=[None])
    sequencer: str | None = Field(
        None,
        description="Orders events for one key; tells two writes of it apart.",
        examples=["0055AED6DCD90281E5"],
    )


class S3Entity(BaseModel):
    """The `s3` part of an event record: which bucket and object."""

    model_config = ConfigDict(extra="ignore")

    bucket: S3Bucket | None = Field(None, description="The bucket.")
    object: S3Object | None = Field(None, description="The object.")


def is_object_created(event_name: str | None) -> bool:
    """``ObjectCreated:*``, with or without the ``s3:`` prefix some stores (MinIO) add."""
    return event_name is not None and event_name.removeprefix("s3:").startswith("ObjectCreated:")


class S3EventRecord(BaseModel):
    """One record of an S3 event notification. Only `ObjectCreated:*` records are acted on."""

    model_config = ConfigDict(extra="ignore")

    eventName: str | None = Field(
        None,
        description="e.g. `ObjectCreated:Put` (AWS) or `s3:ObjectCreated:Put` (MinIO).",
        examples=["ObjectCreated:Put"],
    )
    s3: S3Entity | None = Field(None, description="The bucket and object the event is about.")

    @model_validator(mode="after")
    def _created_names_an_object(self) -> S3EventRecord:
        if is_object_created(self.eventName):
            s3 = self.s3
            if s3 is None or s3.bucket is None or not s3.bucket.name:
                raise ValueError("an ObjectCreated record needs s3.bucket.name")
            if s3.object is None or not s3.object.key:
                raise ValueError("an ObjectCreated record needs s3.object.key")
            _check_record_object(s3.bucket.name, s3.object)
        return self


def _check_record_object(bucket: str, obj: S3Object) -> None:
    """The same reference rules as ``POST /v1/scans``, each error naming its field."""
    checks: list[tuple[str, Any]] = [
        ("s3.bucket.name", lambda: check_bucket_name(bucket)),
        ("s3.object.key", lambda: _check_event_key(str(obj.key))),
    ]
    if obj.versionId:
        checks.append(("s3.object.versionId", lambda: check_version_id(obj.versionId or "")))
    if obj.eTag:
        checks.append(("s3.object.eTag", lambda: _check_etag(obj.eTag or "")))
    for field, check in checks:
        try:
            check()
        except ValueError as exc:
            raise ValueError(f"{field}: {exc}") from None


def _check_event_key(encoded: str) -> None:
    key = unquote_plus(encoded)
    if key.endswith("/"):  # a folder marker: ignored, not refused
        key = key.rstrip("/")
        if not key:
            return
    check_object_key(key)


def _check_etag(etag: str) -> None:
    if len(etag) > MAX_ETAG_LENGTH or not etag.isprintable():
        raise ValueError(f"must be at most {MAX_ETAG_LENGTH} printable characters")


TEST_EVENT = "s3:TestEvent"


def _is_notification(body: Any) -> TypeGuard[dict[str, Any]]:
    return isinstance(body, dict) and ("Records" in body or body.get("Event") == TEST_EVENT)


def _is_sqs_message(record: Any) -> bool:
    return isinstance(record, dict) and record.get("eventSource") == "aws:sqs" and isinstance(record.get("body"), str)


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _unwrap_notification(body: Any) -> Any:
    """The S3 notification a request body carries, or a ValueError that says what the body is.

    A body with neither ``Records`` nor AWS's test event must not answer 200 with nothing
    queued: a forwarder sending the wrong shape would then lose every upload without a sign.
    """
    if not isinstance(body, dict):
        return body  # the model's own validation says what is wrong with it
    if _is_notification(body):
        return _sqs_messages_unwrapped(body)
    return _unwrap_envelope(body)


def _unwrap_envelope(body: dict[str, Any]) -> dict[str, Any]:
    """The S3 notification inside an SNS envelope, or a ValueError naming what ``body`` is."""
    if body.get("Type") == "Notification" and isinstance(body.get("Message"), str):
        # An SNS envelope (an SQS queue subscribed to the topic without raw delivery, relayed
        # as is): its Message is the S3 notification, keys URL-encoded as S3 wrote them.
        inner = _json_or_none(body["Message"])
        if _is_notification(inner):
            return inner
        raise ValueError("an SNS notification whose Message is not an S3 event notification")
    if body.get("Type") in ("SubscriptionConfirmation", "UnsubscribeConfirmation"):
        # Following SubscribeURL would be a fetch chosen by the request's sender.
        raise ValueError(
            "an SNS subscription confirmation: synthguard never visits its SubscribeURL; confirm "
            "the subscription out of band, or subscribe an SQS queue and forward its messages"
        )
    if "detail-type" in body and "detail" in body:
        raise ValueError(
            "an EventBridge event, not an S3 event notification: send the bucket's event "
            "notifications (Records) here, directly or through SNS/SQS"
        )
    raise ValueError(f"not an S3 event notification: no `Records` list and no `Event` of {TEST_EVENT}")


def _sqs_messages_unwrapped(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with each SQS message among its records replaced by the S3 records it carries.

    An SQS batch as a Lambda receives it, forwarded whole, has records that are messages, whose
    ``body`` is the S3 notification (or its SNS envelope); as records they would all be ignored.
    """
    records = body.get("Records")
    if not isinstance(records, list) or not any(_is_sqs_message(r) for r in records):
        return body
    flat: list[Any] = []
    for index, record in enumerate(records):
        if not _is_sqs_message(record):
            flat.append(record)
            continue
        inner = _json_or_none(record["body"])
        if not isinstance(inner, dict):
            raise ValueError(f"Records[{index}] is an SQS message whose body is not a JSON object")
        if not _is_notification(inner):
            try:
                inner = _unwrap_envelope(inner)
            except ValueError as exc:
                raise ValueError(f"Records[{index}] is an SQS message whose body is {exc}") from None
        carried = inner.get("Records", [])  # none in a test event
        if not isinstance(carried, list):
            raise ValueError(f"Records[{index}] is an SQS message whose body's Records is not a list")
        flat.extend(carried)
    return {**body, "Records": flat}


class S3Notification(BaseModel):
    """An S3 event notification as AWS or an S3-compatible store (MinIO) sends it.

    Unwrapped: an SNS `Notification` envelope whose `Message` is one, and an SQS batch as a
    Lambda receives it (records with `eventSource` `aws:sqs`), whose message bodies are
    notifications or their SNS envelopes. Any other body without `Records` (an EventBridge
    event, an SNS subscription confirmation, a body of the wrong shape), or an SQS message
    that carries one, is 422, so that a misconfigured forwarder is told at once instead of
    answered 200 with nothing queued.
    """

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "Records": [
                        {
                            "eventVersion": "2.1",
                            "eventSource": "aws:s3",
                            "eventName": "ObjectCreated:Put",
                            "s3": {
                                "bucket": {"name": "uploads"},
                                "object": {
                                    "key": "photos/my+summer%C3%A9.jpg",
                                    "size": 48213,
                                    "eTag": "9b2cf535f27731c974343645a3985328",
                                    "sequencer": "0055AED6DCD90281E5",
                                },
                            },
                        }
                    ]
                },
                {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "uploads"},
            ]
        },
    )

    Records: list[S3EventRecord] = Field(
        default_factory=list,
        max_length=MAX_EVENT_RECORDS,
        description=f"The event records, at most {MAX_EVENT_RECORDS} (more: 413). Absent in AWS's "
        "`s3:TestEvent`, which is accepted and queues nothing.",
    )
    Event: str | None = Field(None, description="`s3:TestEvent` in AWS's test message.", examples=[None])

    @model_validator(mode="before")
    @classmethod
    def _from_envelope(cls, body: Any) -> Any:
        return _unwrap_notification(body)


class EventImage(ImageRef):
    """The image an `ObjectCreated` record maps to."""

    duplicate: bool = Field(
        description="True when this event was received before (or earlier in this body): nothing new "
        "was queued, and `id` is the image queued the first time.",
        examples=[False],
    )


class EventsAccepted(BaseModel):
    """What an S3 event notification queued."""

    scan_id: uuid.UUID | None = Field(
        description="The scan holding the newly queued images; null when nothing new was queued.",
        examples=[EXAMPLE_SCAN_ID],
    )
    images: list[EventImage] = Field(description="One entry per `ObjectCreated` record, in order.")
    ignored: int = Field(
        description="Records that were not `ObjectCreated` events (or named a folder), and so were skipped.",
        examples=[0],
    )


# -------------------------------------------------------------- operations


class Health(BaseModel):
    """The process is alive."""

    status: Literal["ok"] = Field(description="Always `ok`.")


class Readiness(BaseModel):
    """The services the API needs answer."""

    status: Literal["ready"] = Field(description="Always `ready` (otherwise the answer is a 503 problem).")
    checks: dict[str, str] = Field(
        description="Each dependency and its state.", examples=[{"database": "ok", "broker": "ok"}]
    )
