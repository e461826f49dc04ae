"""Bodies of the operator endpoints ``/healthz`` and ``/readyz``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

__all__ = ["Health", "Readiness"]


class Health(BaseModel):
    """The process is alive."""

    status: Literal["ok"] = Field(description="Always `ok`.")


class Readiness(BaseModel):
    """The services the API needs answer."""

    status: Literal["ready"] = Field(description="Always `ready` (otherwise the answer is a 503 problem).")
    checks: dict[str, str] = Field(
        description="Each dependency and its state.", examples=[{"database": "ok", "broker": "ok"}]
    )
