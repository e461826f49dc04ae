"""Bodies of ``POST /v1/s3-events``: S3 event notifications, unwrapped from SNS and SQS, and what they queued."""

from __future__ import annotations

import json
import uuid
from typing import Any, TypeGuard
from urllib.parse import unquote_plus

from pydantic import BaseModel, ConfigDict, Field, model_validator

from worker.storage import MAX_ETAG_LENGTH, check_bucket_name, check_object_key, check_version_id

from .common import EXAMPLE_SCAN_ID
from .scans import ImageRef

__all__ = [
    "MAX_EVENT_RECORDS",
    "TEST_EVENT",
    "EventImage",
    "EventsAccepted",
    "S3Bucket",
    "S3Entity",
    "S3EventRecord",
    "S3Notification",
    "S3Object",
    "is_object_created",
]

MAX_EVENT_RECORDS = 1000


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
    return (
        isinstance(record, dict)
        and record.get("eventSource") == "aws:sqs"
        and isinstance(record.get("body"), str)
    )


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
