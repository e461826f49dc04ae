"""What every part of the API shares: problem bodies, UTC timestamps, example ids."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from worker.models import as_utc

__all__ = [
    "EXAMPLE_CLIENT_ID",
    "EXAMPLE_IMAGE_ID",
    "EXAMPLE_SCAN_ID",
    "FieldError",
    "Problem",
    "UtcDatetime",
    "ValidationProblem",
]

EXAMPLE_SCAN_ID = "8a4f3c0e-4b7e-4f0f-9a63-1f7d0c2b9e11"
EXAMPLE_IMAGE_ID = "0d9c7a2e-5a61-4f3b-8e0e-3c2b1a9f8d77"
EXAMPLE_CLIENT_ID = "5b1d2e3f-0a9c-4c1e-b7d8-6e5f4a3b2c1d"

UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]


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
