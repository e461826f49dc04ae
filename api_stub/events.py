"""``POST /v1/s3-events``: S3 event notifications in, one queued image per new object out."""

from __future__ import annotations

from urllib.parse import unquote_plus

from fastapi import APIRouter, Request, Response

from worker.queueing import ObjectEvent, enqueue_object_events

from .auth import AuthenticatedClient, refuse_unless_allowed
from .metrics import IMAGES_ENQUEUED, SCANS_CREATED
from .problems import problem_responses
from .schemas import EventImage, EventsAccepted, S3EventRecord, S3Notification, is_object_created
from .state import get_state

router = APIRouter(prefix="/v1")


def object_event(record: S3EventRecord) -> ObjectEvent | None:
    """The object a record announces, or None when it announces no object to score."""
    if not is_object_created(record.eventName) or record.s3 is None:
        return None
    bucket, obj = record.s3.bucket, record.s3.object
    if bucket is None or obj is None or not bucket.name or not obj.key:
        return None
    # Stores URL-encode keys in notifications, with '+' for a space.
    key = unquote_plus(obj.key)
    if key.endswith("/"):  # a "folder" marker, which consoles create as an empty object
        return None
    etag = obj.eTag.strip('"') if obj.eTag else None
    return ObjectEvent(bucket.name, key, obj.versionId or None, etag, obj.sequencer or None)


@router.post(
    "/s3-events",
    status_code=202,
    response_model=EventsAccepted,
    tags=["events"],
    summary="Receive S3 event notifications",
    description="Point a bucket's event notifications here (MinIO: a webhook target with "
    "`auth_token` set to an API key; AWS: a forwarder, such as a Lambda on the SQS queue or SNS "
    "topic the bucket notifies, that posts the S3 event JSON with the `Authorization` header; an "
    "SNS `Notification` envelope, and an SQS batch forwarded whole, are unwrapped). A body that "
    "is not an S3 event notification (an EventBridge event, an SNS subscription confirmation) is "
    "422, never a silent 200. Every `ObjectCreated:*` record queues its object on the realtime "
    "lane (the bulk lane for a client limited to it); other records are ignored and counted. "
    "Every object must lie inside this client's grants: one outside them makes the whole request "
    "403 `not-granted` and queues nothing. Objects count against the client's images per minute "
    "and its cap on images queued and not yet done (429 with `Retry-After`); a bucket "
    "notification target retries such answers. A notification delivered again queues "
    "nothing new: each record is recognised by bucket, key, version id, ETag and sequencer, and "
    "answers with the image queued the first time (`duplicate: true`). Answers 202 when something "
    "new was queued, 200 when nothing was (AWS's `s3:TestEvent`, only ignored records, only "
    "duplicates).",
    responses={
        200: {"model": EventsAccepted, "description": "Nothing new to queue (a test event or a redelivery)."},
        202: {"description": "New images were queued."},
        **problem_responses(401, 403, 413, 422, 429, 503),
    },
)
def receive_s3_events(
    body: S3Notification, request: Request, response: Response, client: AuthenticatedClient
) -> EventsAccepted:
    events: list[ObjectEvent] = []
    ignored = 0
    for record in body.Records:
        event = object_event(record)
        if event is None:
            ignored += 1
        else:
            events.append(event)
    state = get_state(request)
    if events:
        refuse_unless_allowed(
            state.rate_limiter.hit_images(client.id, len(events), client.images_per_minute), "images"
        )
    intake = enqueue_object_events(
        events,
        client_id=client.id,
        settings=state.settings,
        sessions=state.sessions,
        app=state.celery,
    )
    if intake.scan_id is not None:
        SCANS_CREATED.labels(intake.priority).inc()
        IMAGES_ENQUEUED.labels(intake.priority).inc(intake.new_count)
    else:
        response.status_code = 200
    return EventsAccepted(
        scan_id=intake.scan_id,
        images=[
            EventImage(
                id=image_id, bucket=event.bucket, key=event.key, version_id=event.version_id, duplicate=dup
            )
            for event, image_id, dup in zip(events, intake.image_ids, intake.duplicates, strict=True)
        ],
        ignored=ignored,
    )
