"""Webhook deliveries as the client sees them: list, replay, re-enable endpoints, manage signing secrets."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.clients import SecretRotationConflict, revoke_previous_secret, rotate_webhook_secret
from worker.models import ApiClient, WebhookDelivery
from worker.outbox import disabled_callbacks, enable_endpoint_state, replay
from worker.queueing import publish_deliveries
from worker.secretbox import SecretBox

from .auth import AuthenticatedClient
from .problems import ProblemError, not_found, parse_id, problem_responses
from .schemas import (
    Attempt,
    DeliveryList,
    DeliveryOut,
    DisabledCallback,
    EnabledEndpoint,
    EnableRequest,
    Endpoint,
    Problem,
    RevokedSecret,
    RotatedSecret,
    RotateRequest,
)
from .state import get_state

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

MAX_PAGE = 500


_CONFLICT = {
    409: {
        "model": Problem,
        "description": "The previous secret still signs (its overlap has not ended): rotating again would "
        "drop it without warning. Revoke it first, or rotate with `revoke_previous`.",
    }
}


def _own_client(session: Session, client_id: uuid.UUID) -> ApiClient:
    """The caller's own row, for the secret functions of ``worker.clients`` to change; 404 if it went away."""
    owner = session.get(ApiClient, client_id)
    if owner is None:
        raise not_found("client")
    return owner


def _delivery(row: WebhookDelivery) -> DeliveryOut:
    """A delivery row as the API shows it, its attempt log typed."""
    data: dict[str, Any] = {c: getattr(row, c) for c in DeliveryOut.model_fields if c != "attempt_log"}
    return DeliveryOut(**data, attempt_log=[Attempt(**entry) for entry in (row.attempt_log or [])])


@router.get(
    "/deliveries",
    response_model=DeliveryList,
    summary="List webhook deliveries and their attempts",
    description="This client's deliveries, newest first, each with every attempt's HTTP status, latency and "
    "error; optionally only one scan's. Also says whether the client's endpoint is disabled, and why, and "
    "lists the scans' callback URLs that are disabled (each URL is disabled on its own).",
    responses={200: {"description": "The deliveries."}, **problem_responses(401, 404, 422, 429, 503)},
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
        callbacks = [
            DisabledCallback(url=state.url, disabled_at=state.disabled_at, disabled_reason=state.disabled_reason)
            for state in disabled_callbacks(session, client.id)
            if state.disabled_at is not None
        ]
        return DeliveryList(
            endpoint=endpoint, disabled_callbacks=callbacks, deliveries=[_delivery(row) for row in rows]
        )


@router.post(
    "/deliveries/{delivery_id}/replay",
    status_code=202,
    response_model=DeliveryOut,
    summary="Send a delivery again",
    description="Queues a new attempt now, with the same `webhook-id` and body, whatever the delivery's "
    "state; if the delivery's URL (the client's webhook URL or a scan's callback URL) is disabled, that URL, "
    "and only it, is enabled again. Other clients' deliveries answer 404.",
    responses={202: {"description": "Queued."}, **problem_responses(401, 404, 429, 503)},
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
    "/endpoint/enable",
    response_model=EnabledEndpoint,
    summary="Send to a disabled endpoint again",
    description="Enables one endpoint of this client: the callback URL in `url`, or without a body (or with "
    "`url` null) the client's own webhook URL. New events for it are sent again; deliveries it missed while "
    "disabled stay `failed`, replay the ones you want. Enabling an enabled endpoint changes nothing. 404 when "
    "the URL is neither the client's webhook URL nor a callback URL that was disabled.",
    responses={200: {"description": "The endpoint, enabled."}, **problem_responses(401, 404, 422, 429, 503)},
)
def enable_webhook_endpoint(
    request: Request, client: AuthenticatedClient, body: EnableRequest | None = None
) -> EnabledEndpoint:
    url = body.url if body is not None else None
    with get_state(request).sessions.begin() as session:
        state = enable_endpoint_state(session, client.id, url)
        if state is None:
            what = "webhook URL" if url is None else "disabled callback endpoint with this URL"
            raise ProblemError(404, f"This API key has no {what}.", slug="not-found")
    return EnabledEndpoint(url=state.url, disabled_at=state.disabled_at, disabled_reason=state.disabled_reason)


@router.post(
    "/secret/rotate",
    response_model=RotatedSecret,
    summary="Rotate the webhook signing secret",
    description="Issues a new `whsec_...` secret. During the overlap window (SYNTHGUARD_WEBHOOK_SECRET_OVERLAP_S) "
    "each delivery carries two signatures in `webhook-signature`, one per secret; afterwards only the new one. "
    "At most two secrets sign at once: while the previous one still signs, rotating again is 409 unless the "
    "body says `revoke_previous` (then only the new secret signs, at once).",
    responses={
        200: {"description": "The new secret, shown once."},
        **_CONFLICT,
        **problem_responses(401, 404, 422, 429, 503),
    },
)
def rotate_secret(request: Request, client: AuthenticatedClient, body: RotateRequest | None = None) -> RotatedSecret:
    state = get_state(request)
    box = SecretBox.from_settings(state.settings)
    revoke = body.revoke_previous if body is not None else False
    with state.sessions.begin() as session:
        owner = _own_client(session, client.id)
        try:
            secret, until = rotate_webhook_secret(
                session, owner, box, overlap_s=state.settings.webhook_secret_overlap_s, revoke_previous=revoke
            )
        except SecretRotationConflict as exc:
            raise ProblemError(
                409,
                f"The previous webhook secret still signs until {exc.until.isoformat()}; rotating again would "
                "drop it without warning. Revoke it first (POST /v1/webhooks/secret/revoke-previous), or "
                'rotate with {"revoke_previous": true}.',
                slug="secret-rotation-conflict",
                title="The previous secret still signs",
                previous_valid_until=exc.until.isoformat(),
            ) from None
    return RotatedSecret(webhook_secret=secret, previous_valid_until=until)


@router.post(
    "/secret/revoke-previous",
    response_model=RevokedSecret,
    summary="Stop signing with the previous webhook secret",
    description="Ends the rotation overlap now: from the next attempt on, deliveries carry only the current "
    "secret's signature. Use it once every receiver verifies with the new secret, or at once when the old "
    "one leaked.",
    responses={200: {"description": "Done."}, **problem_responses(401, 404, 429, 503)},
)
def revoke_previous(request: Request, client: AuthenticatedClient) -> RevokedSecret:
    with get_state(request).sessions.begin() as session:
        return RevokedSecret(revoked=revoke_previous_secret(session, _own_client(session, client.id)))
