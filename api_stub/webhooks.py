"""Webhook deliveries as the client sees them: list, replay, rotate the signing secret."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from worker.clients import new_webhook_secret
from worker.models import ApiClient, WebhookDelivery, utcnow
from worker.outbox import replay
from worker.queueing import publish_deliveries

from .auth import AuthenticatedClient
from .problems import problem_responses
from .scans import not_found, parse_id
from .state import get_state

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

MAX_PAGE = 500


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
    state: str = Field(description="`pending` (will be tried), `delivered` (a 2xx answer) or `failed` (given up).")
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
        "Replaying a delivery enables it again."
    )


class DeliveryList(BaseModel):
    """A client's webhook deliveries and the state of its endpoint."""

    endpoint: Endpoint = Field(description="The client's endpoint and its state.")
    deliveries: list[DeliveryOut] = Field(description="Newest first.")


class RotatedSecret(BaseModel):
    """A new webhook signing secret, and how long the previous one still signs."""

    webhook_secret: str = Field(description="The new `whsec_...` secret: shown once, store it now.")
    previous_valid_until: datetime = Field(
        description="Until then every delivery carries signatures with both secrets, so receivers can switch "
        "over without failing a verification."
    )


def _delivery(row: WebhookDelivery) -> DeliveryOut:
    data: dict[str, Any] = {c: getattr(row, c) for c in DeliveryOut.model_fields if c != "attempt_log"}
    return DeliveryOut(**data, attempt_log=[Attempt(**entry) for entry in (row.attempt_log or [])])


@router.get(
    "/deliveries",
    response_model=DeliveryList,
    summary="List webhook deliveries and their attempts",
    description="This client's deliveries, newest first, each with every attempt's HTTP status, latency and "
    "error; optionally only one scan's. Also says whether the endpoint is disabled, and why.",
    responses={200: {"description": "The deliveries."}, **problem_responses(401, 403, 404, 422, 429, 503)},
)
def list_deliveries(
    request: Request,
    client: AuthenticatedClient,
    scan_id: Annotated[str | None, Query(description="Only this scan's deliveries.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Most deliveries to list.")] = 100,
) -> DeliveryList:
    query = select(WebhookDelivery).where(WebhookDelivery.client_id == client.id)
    if scan_id is not None:
        query = query.where(WebhookDelivery.scan_id == parse_id(scan_id, "scan"))
    with get_state(request).sessions() as session:
        rows = session.scalars(query.order_by(WebhookDelivery.created_at.desc()).limit(limit)).all()
        owner = session.get(ApiClient, client.id)
        endpoint = Endpoint(
            url=owner.webhook_url if owner else None,
            disabled_at=owner.webhook_disabled_at if owner else None,
            disabled_reason=owner.webhook_disabled_reason if owner else None,
        )
        return DeliveryList(endpoint=endpoint, deliveries=[_delivery(row) for row in rows])


@router.post(
    "/deliveries/{delivery_id}/replay",
    status_code=202,
    response_model=DeliveryOut,
    summary="Send a delivery again",
    description="Queues a new attempt now, with the same `webhook-id` and body, whatever the delivery's "
    "state; a disabled endpoint is enabled again. Other clients' deliveries answer 404.",
    responses={202: {"description": "Queued."}, **problem_responses(401, 403, 404, 429, 503)},
)
def replay_delivery(delivery_id: str, request: Request, client: AuthenticatedClient) -> DeliveryOut:
    state = get_state(request)
    did = parse_id(delivery_id, "delivery")
    with state.sessions.begin() as session:
        queued = replay(session, did, client.id, lease_s=state.settings.stale_after_s)
        if queued is None:
            raise not_found("delivery")
        session.flush()
        out = _delivery(session.get(WebhookDelivery, did))
    # After commit; if the broker is down, the sweeper sends it once the lease expires.
    try:
        publish_deliveries(state.celery, [queued])
    except Exception:  # the row is committed either way
        log.warning("could not publish replay of delivery %s; the sweeper will", did, exc_info=True)
    return out


@router.post(
    "/secret/rotate",
    response_model=RotatedSecret,
    summary="Rotate the webhook signing secret",
    description="Issues a new `whsec_...` secret. During the overlap window (SYNTHGUARD_WEBHOOK_SECRET_OVERLAP_S) "
    "each delivery carries two signatures in `webhook-signature`, one per secret; afterwards only the new one.",
    responses={200: {"description": "The new secret, shown once."}, **problem_responses(401, 403, 429, 503)},
)
def rotate_secret(request: Request, client: AuthenticatedClient) -> RotatedSecret:
    state = get_state(request)
    until = utcnow() + timedelta(seconds=state.settings.webhook_secret_overlap_s)
    secret = new_webhook_secret()
    with state.sessions.begin() as session:
        owner = session.get(ApiClient, client.id)
        if owner is None:
            raise not_found("client")
        owner.webhook_secret_previous = owner.webhook_secret
        owner.webhook_secret_previous_until = until
        owner.webhook_secret = secret
    return RotatedSecret(webhook_secret=secret, previous_valid_until=until)
