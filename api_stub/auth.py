"""Who is calling: ``Authorization: Bearer <api key>``, then the client's rate limit.

Keys are compared by hash (``worker.clients.authenticate``); the key itself is
never logged, stored or echoed back, not even in an error.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from worker.clients import authenticate

from .problems import ProblemError
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
    api_key = _api_key(request)
    state = get_state(request)
    with state.sessions() as session:
        client = authenticate(session, api_key)
    if client is None:
        raise _unauthorized("The API key is not valid.", "invalid_token")
    if client.disabled_at is not None:
        raise ProblemError(403, "This API client is disabled.", slug="client-disabled")
    caller = Caller(client.id, client.name)
    decision = state.rate_limiter.hit(caller.id)
    if not decision.allowed:
        raise ProblemError(
            429,
            f"This API key made more than {decision.limit} requests this minute; "
            f"retry in {decision.retry_after_s} s.",
            slug="rate-limited",
            headers={"Retry-After": str(decision.retry_after_s)},
        )
    return caller


AuthenticatedClient = Annotated[Caller, Depends(current_client)]
