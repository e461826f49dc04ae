"""Errors as RFC 9457 problem details (``application/problem+json``), and their handlers.

Every error the API answers has the same shape, whichever layer produced it:
an endpoint (:class:`ProblemError`), FastAPI's request validation, Starlette's
routing (404, 405), the database being down, or a bug (500, details logged,
never sent).
"""

from __future__ import annotations

import logging
import uuid
from http import HTTPStatus
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker.db import database_unavailable, loggable
from worker.errors import IntakeRefused, LaneNotAllowed, NotGranted, QuotaExceeded
from worker.models import Image, Scan

from .schemas import FieldError, Problem, ValidationProblem

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
# Stable identifiers clients may branch on; "about:blank" when the status code says it all.
TYPE_PREFIX = "urn:synthguard:problem:"
# Seconds a client is asked to wait when the database is down (a restart or failover).
DATABASE_RETRY_AFTER_S = 5


def problem_type(slug: str | None) -> str:
    return TYPE_PREFIX + slug if slug else "about:blank"


class ProblemError(Exception):
    """Raise from an endpoint or dependency to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.slug = slug
        self.title = title
        self.headers = headers or {}
        self.extensions = extensions


def problem_body(
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    title: str | None = None,
    instance: str | None = None,
    **extensions: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": problem_type(slug),
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update(extensions)
    return body


def parse_id(raw: str, what: str) -> uuid.UUID:
    """A path id; a malformed one is answered like an unknown one: 404, never 422."""
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise not_found(what) from None


def not_found(what: str) -> ProblemError:
    """The one 404 of every router: the same for "no such id" and "another client's id",
    so ids cannot be probed."""
    return ProblemError(404, f"There is no {what} with this id for this API key.", slug="not-found")


_Owned = TypeVar("_Owned", Scan, Image)


def owned(session: Session, model: type[_Owned], raw_id: str, client_id: uuid.UUID, what: str) -> _Owned:
    """The client's row of ``model`` with this path id; another client's answers the same 404 as none."""
    row = session.scalar(select(model).where(model.id == parse_id(raw_id, what), model.client_id == client_id))
    if row is None:
        raise not_found(what)
    return row


def problem_response(
    request: Request | None,
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    instance = request.url.path if request is not None else None
    return JSONResponse(
        problem_body(status, detail, slug=slug, title=title, instance=instance, **extensions),
        status_code=status,
        headers=headers,
        media_type=PROBLEM_MEDIA_TYPE,
    )


def field_errors(errors: list[dict[str, Any]] | Any) -> list[dict[str, Any]]:
    """Pydantic's errors without ``input`` and ``ctx``: they may echo large or private values."""
    return [
        FieldError(
            loc=list(err.get("loc", ())), msg=str(err.get("msg", "")), type=str(err.get("type", ""))
        ).model_dump()
        for err in errors
    ]


def _summary(errors: list[dict[str, Any]]) -> str:
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON."
    if first.get("type") == "model_attributes_type" and first.get("loc") == ["body"]:
        return "The request body must be a JSON object, sent with Content-Type: application/json."
    parts = [
        f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}" for err in errors[:3]
    ]
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "The request is invalid: " + "; ".join(parts) + more + "."


def _too_many_items(errors: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A top-level body list over its cap: that is 413 (too much at once), not a malformed request."""
    for err in errors:
        loc = tuple(err.get("loc", ()))
        if err.get("type") == "too_long" and len(loc) == 2 and loc[0] == "body":
            return err
    return None


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(
        request, exc.status, exc.detail, slug=exc.slug, title=exc.title, headers=exc.headers, **exc.extensions
    )


async def _on_intake_refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, IntakeRefused)
    extensions: dict[str, Any] = {}
    headers: dict[str, str] = {}
    if isinstance(exc, NotGranted):
        extensions = {"bucket": exc.bucket}
    elif isinstance(exc, LaneNotAllowed):
        extensions = {"lane": exc.lane, "allowed_lanes": exc.allowed}
    elif isinstance(exc, QuotaExceeded):
        extensions = {"limit": exc.limit}
        headers = {"Retry-After": str(exc.retry_after_s)}
    return problem_response(
        request, exc.status, exc.message, slug=exc.code.replace("_", "-"), headers=headers, **extensions
    )


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        detail = f"There is no resource at {request.url.path}."
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}."
    else:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).description
    return problem_response(request, exc.status_code, detail, headers=dict(exc.headers or {}))


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    raw = list(exc.errors())
    too_long = _too_many_items(raw)
    if too_long is not None:
        ctx = too_long.get("ctx") or {}
        field = too_long["loc"][1]
        return problem_response(
            request,
            413,
            f"Too many items in {field}: at most {ctx.get('max_length')} per request, "
            f"got {ctx.get('actual_length')}. Split the request.",
            slug="too-many-items",
            title="Too many items in one request",
        )
    errors = field_errors(raw)
    return problem_response(
        request,
        422,
        _summary(errors),
        slug="validation-error",
        title="The request is invalid",
        errors=errors,
    )


async def _on_database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # The message of a driver error can carry the database URL; it goes to the log only.
    log.warning("database unavailable during %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return problem_response(
        request,
        503,
        "The database is unavailable; retry later.",
        slug="database-unavailable",
        title="Service unavailable",
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
    )


async def _on_database_error(request: Request, exc: Exception) -> JSONResponse:
    if database_unavailable(exc):
        return await _on_database_unavailable(request, exc)
    # A statement the database refused. Its message quotes the values (object keys, metadata),
    # so the log gets class, SQLSTATE and statement; handled here, the server logs no traceback.
    log.error("unexpected database error in %s %s: %s", request.method, request.url.path, loggable(exc))
    return problem_response(request, 500, "An unexpected error occurred; it has been logged.")


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(request, 500, "An unexpected error occurred; it has been logged.")


def install_problem_handlers(app: FastAPI) -> None:
    """Make every error of ``app`` a problem document."""
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(IntakeRefused, _on_intake_refused)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    # db.database_unavailable tells an outage (503) from a refused statement (500).
    app.add_exception_handler(DBAPIError, _on_database_error)
    app.add_exception_handler(PoolTimeoutError, _on_database_error)
    app.add_exception_handler(Exception, _on_unexpected)


_DESCRIPTIONS = {
    401: "No API key, a malformed `Authorization` header, an unknown, expired (rotated) or disabled key. "
    "The response carries `WWW-Authenticate: Bearer`.",
    403: "Not allowed for this API client: an object outside its grants (`not-granted`, naming the "
    "`bucket`), or a lane it may not use (`lane-not-allowed`).",
    409: "The request conflicts with the current state (see `detail`).",
    404: "No such resource for this API key (another client's ids are indistinguishable from unknown ones).",
    413: "The request body, or one of its lists, is larger than allowed.",
    422: "The request is invalid; `errors` lists each offending field.",
    429: "Too much at once: requests or images over this client's per-minute limits (`rate-limited`), "
    "requests or failed authentications over the per-address limit, or more images queued than the "
    "client's cap for the lane (`quota-exceeded`); see `Retry-After`.",
    503: "A service the API depends on (database, broker, or the rate limiter's Redis) is unavailable; "
    "retry later.",
}


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error codes (moved to problem+json by the schema builder)."""
    return {
        code: {"model": ValidationProblem if code == 422 else Problem, "description": _DESCRIPTIONS[code]}
        for code in codes
    }
