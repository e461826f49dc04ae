"""Who is calling: ``Authorization: Bearer <api key>``, then the client's rate limit.

Keys are compared by hash (``worker.clients.authenticate``); the key itself is
never logged, stored or echoed back, not even in an error. A failed
authentication counts against the caller's address (``ratelimit.AddressGuard``
refuses an address over that limit before the next lookup).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from worker.clients import authenticate

from .problems import ProblemError
from .ratelimit import BACKOFF_S, Decision, client_address
from .state import get_state

# Declares the scheme in OpenAPI; the header is parsed below, to say precisely what is wrong.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    bearerFormat="API key",
    description="An API key from `synthguard clients create NAME`, sent as `Authorization: Bearer sg_...`.",
)

_REALM = 'Bearer realm="synthguard"'


@dataclass(frozen=True)
class Caller:
    """The authenticated API client."""

    id: uuid.UUID
    name: str
    images_per_minute: int | None = None  # the client's own image rate; None: the server's
    callback_hosts: tuple[str, ...] | None = None  # hosts its callback URLs may name; None: any


def _unauthorized(detail: str, error: str | None = None) -> ProblemError:
    # RFC 6750: no error code when the request carried no credentials at all.
    challenge = f'{_REALM}, error="{error}"' if error else _REALM
    return ProblemError(401, detail, slug="unauthorized", headers={"WWW-Authenticate": challenge})


def _api_key(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("This endpoint needs an API key: send 'Authorization: Bearer <api key>'.")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise _unauthorized(
            "The Authorization header is malformed: expected 'Bearer <api key>'.", "invalid_request"
        )
    return token


def current_client(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Caller:
    """Authenticate the request and count it against its client's rate limit."""
    state = get_state(request)
    try:
        api_key = _api_key(request)
    except ProblemError:
        state.rate_limiter.auth_failed(client_address(request.scope))
        raise
    with state.sessions() as session:
        client = authenticate(session, api_key)
    if client is None or client.disabled_at is not None:
        state.rate_limiter.auth_failed(client_address(request.scope))
        # A disabled client is told so, but as 401: none of its keys authenticates any more.
        detail = "The API key is not valid." if client is None else "This API client is disabled."
        raise _unauthorized(detail, "invalid_token")
    caller = Caller(
        client.id,
        client.name,
        images_per_minute=client.images_per_minute,
        callback_hosts=tuple(client.callback_hosts) if client.callback_hosts else None,
    )
    refuse_unless_allowed(state.rate_limiter.hit(caller.id), "requests")
    return caller


def refuse_unless_allowed(decision: Decision, what: str) -> None:
    """Answer 429 (over a limit) or 503 (the counters are unreachable) unless ``decision`` allows."""
    if decision.allowed:
        return
    if decision.unavailable:
        raise ProblemError(
            503,
            "The rate limiter cannot reach its Redis; retry later.",
            slug="rate-limiter-unavailable",
            headers={"Retry-After": str(int(BACKOFF_S))},
        )
    raise ProblemError(
        429,
        f"This API key is over its limit of {decision.limit} {what} a minute; retry in {decision.retry_after_s} s.",
        slug="rate-limited",
        headers={"Retry-After": str(decision.retry_after_s)},
    )


AuthenticatedClient = Annotated[Caller, Depends(current_client)]
