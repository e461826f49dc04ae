"""Bodies of ``/v1/webhooks``: deliveries and their attempts, endpoint state, signing-secret rotation."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.sanitise import first_unsafe

__all__ = [
    "Attempt",
    "DeliveryList",
    "DeliveryOut",
    "DisabledCallback",
    "EnableRequest",
    "EnabledEndpoint",
    "Endpoint",
    "RevokedSecret",
    "RotateRequest",
    "RotatedSecret",
]


class Attempt(BaseModel):
    """One try at sending a delivery."""

    attempt: int = Field(description="1 for the first try.")
    at: datetime = Field(description="When the attempt ended (UTC).")
    status: int | None = Field(description="The endpoint's HTTP status; null when there was no answer.")
    latency_ms: float = Field(description="Time from connecting to the answer, in milliseconds.")
    error: str | None = Field(description="Why the attempt failed (timeout, refused address, HTTP 500...).")


class DeliveryOut(BaseModel):
    """One webhook event for one endpoint, and every attempt to send it."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID = Field(description="Also the `webhook-id` header: the same on every attempt.")
    event_type: str = Field(description="`image.flagged` or `scan.completed`.")
    scan_id: uuid.UUID | None = Field(description="The scan the event is about.")
    image_id: uuid.UUID | None = Field(description="The image, for `image.flagged`.")
    url: str = Field(description="Where it is sent.")
    state: str = Field(
        description="`pending` (will be tried), `delivered` (a 2xx answer) or `failed` (given up)."
    )
    attempts: int = Field(description="Attempts made so far.")
    next_attempt_at: datetime | None = Field(description="When the next attempt is due, while pending.")
    last_status: int | None = Field(description="HTTP status of the last attempt.")
    last_error: str | None = Field(description="Error of the last attempt.")
    created_at: datetime = Field(description="When the event happened.")
    delivered_at: datetime | None = Field(description="When a 2xx answer arrived.")
    attempt_log: list[Attempt] = Field(description="Every attempt, oldest first.")


class Endpoint(BaseModel):
    """The client's own webhook endpoint and whether synthguard still sends to it."""

    url: str | None = Field(description="The client's webhook URL (a scan's `callback_url` overrides it).")
    disabled_at: datetime | None = Field(description="When sending was stopped; null while enabled.")
    disabled_reason: str | None = Field(
        description="Why: the endpoint answered 410 Gone, or kept failing for the whole retry schedule. "
        "Replaying one of its deliveries, or `POST /v1/webhooks/endpoint/enable`, enables it again."
    )


class DisabledCallback(BaseModel):
    """A scan's callback URL that synthguard stopped sending to; the client's own endpoint is unaffected."""

    url: str = Field(description="The callback URL, as scans named it.")
    disabled_at: datetime = Field(description="When sending to it was stopped.")
    disabled_reason: str | None = Field(
        description="Why: it answered 410 Gone, or kept failing for the whole retry schedule."
    )


class DeliveryList(BaseModel):
    """A client's webhook deliveries and the state of its endpoints."""

    endpoint: Endpoint = Field(description="The client's endpoint and its state.")
    disabled_callbacks: list[DisabledCallback] = Field(
        description="Scans' callback URLs that get no new deliveries (each one is disabled on its own; "
        "new events for it are recorded `failed` with `endpoint disabled`), most recently disabled first. "
        "Enable one with `POST /v1/webhooks/endpoint/enable` and its `url`, or by replaying a delivery to it."
    )
    deliveries: list[DeliveryOut] = Field(description="Newest first.")


class EnableRequest(BaseModel):
    """Which endpoint to send to again."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(
        None,
        description="A callback URL listed in `disabled_callbacks` (or one that was disabled before); "
        "omitted or null: the client's own webhook URL.",
        max_length=4096,
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        if url is not None and (found := first_unsafe(url)) is not None:
            raise ValueError(f"url contains {found}")
        return url


class EnabledEndpoint(BaseModel):
    """An endpoint after it was enabled: synthguard sends its new deliveries again."""

    url: str = Field(description="The endpoint's URL.")
    disabled_at: datetime | None = Field(description="Null: it is enabled.")
    disabled_reason: str | None = Field(description="Null: it is enabled.")


class RotateRequest(BaseModel):
    """How to treat the secret being replaced."""

    model_config = ConfigDict(extra="forbid")

    revoke_previous: bool = Field(
        False,
        description="True: the replaced secret stops signing at once (it leaked), and a previous secret "
        "still in its overlap is dropped too. False (the default): the replaced secret keeps signing "
        "during the overlap window, and rotating again while an older one still signs is 409.",
    )


class RotatedSecret(BaseModel):
    """A new webhook signing secret, and how long the previous one still signs."""

    webhook_secret: str = Field(description="The new `whsec_...` secret: shown once, store it now.")
    previous_valid_until: datetime | None = Field(
        description="Until then every delivery carries signatures with both secrets, so receivers can switch "
        "over without failing a verification. Null: the previous secret stopped signing at once "
        "(`revoke_previous`, or no overlap configured)."
    )


class RevokedSecret(BaseModel):
    """What revoking the previous webhook secret did."""

    revoked: bool = Field(
        description="True when a previous secret was still stored and now signs no more; false when there "
        "was none (nothing changed)."
    )
