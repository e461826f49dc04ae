"""Request and response bodies of the HTTP API, with the documentation OpenAPI shows.

One module per concept: ``common`` (problem bodies, UTC timestamps, example ids),
``scans`` (scans and images), ``events`` (S3 event notifications), ``webhooks``
(deliveries, endpoints, signing secrets), ``operations`` (health, readiness).
Routers import from this package, never from its modules, so a model can move
between them without touching a router.
"""

from __future__ import annotations

from .common import (
    EXAMPLE_CLIENT_ID,
    EXAMPLE_IMAGE_ID,
    EXAMPLE_SCAN_ID,
    FieldError,
    Problem,
    UtcDatetime,
    ValidationProblem,
)
from .events import (
    MAX_EVENT_RECORDS,
    TEST_EVENT,
    EventImage,
    EventsAccepted,
    S3Bucket,
    S3Entity,
    S3EventRecord,
    S3Notification,
    S3Object,
    is_object_created,
)
from .operations import Health, Readiness
from .scans import (
    MAX_JSON_DEPTH,
    MAX_METADATA_BYTES,
    MAX_OBJECTS,
    MAX_URL_LENGTH,
    ImageDetail,
    ImageOut,
    ImageRef,
    ObjectIn,
    ScanAccepted,
    ScanCounts,
    ScanOut,
    ScanRequest,
    check_idempotency_key,
)
from .webhooks import (
    Attempt,
    DeliveryList,
    DeliveryOut,
    DisabledCallback,
    EnabledEndpoint,
    EnableRequest,
    Endpoint,
    RevokedSecret,
    RotatedSecret,
    RotateRequest,
)

__all__ = [
    "EXAMPLE_CLIENT_ID",
    "EXAMPLE_IMAGE_ID",
    "EXAMPLE_SCAN_ID",
    "MAX_EVENT_RECORDS",
    "MAX_JSON_DEPTH",
    "MAX_METADATA_BYTES",
    "MAX_OBJECTS",
    "MAX_URL_LENGTH",
    "TEST_EVENT",
    "Attempt",
    "DeliveryList",
    "DeliveryOut",
    "DisabledCallback",
    "EnableRequest",
    "EnabledEndpoint",
    "Endpoint",
    "EventImage",
    "EventsAccepted",
    "FieldError",
    "Health",
    "ImageDetail",
    "ImageOut",
    "ImageRef",
    "ObjectIn",
    "Problem",
    "Readiness",
    "RevokedSecret",
    "RotateRequest",
    "RotatedSecret",
    "S3Bucket",
    "S3Entity",
    "S3EventRecord",
    "S3Notification",
    "S3Object",
    "ScanAccepted",
    "ScanCounts",
    "ScanOut",
    "ScanRequest",
    "UtcDatetime",
    "ValidationProblem",
    "check_idempotency_key",
    "is_object_created",
]
