"""Endpoints for operators and orchestrators: ``/healthz``, ``/readyz``, ``/metrics``. No API key."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from sqlalchemy import text

from .metrics import render
from .problems import ProblemError, problem_responses
from .schemas import Health, Readiness
from .state import ApiState, get_state

log = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])

BROKER_TIMEOUT_S = 2.0


@router.get(
    "/healthz",
    response_model=Health,
    summary="Liveness",
    description="200 while the process can answer HTTP. Touches no other service: restart the "
    "process when this fails, not when the database does (that is `/readyz`).",
)
def healthz() -> Health:
    return Health(status="ok")


def _database_ok(state: ApiState) -> bool:
    try:
        with state.sessions() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"; the URL stays out of the log
        log.warning("readiness: database unavailable (%s)", type(exc).__name__)
        return False
    return True


def _broker_ok(state: ApiState) -> bool:
    try:
        with state.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=BROKER_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds
        log.warning("readiness: broker unavailable (%s)", type(exc).__name__)
        return False
    return True


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness",
    description="200 when the database answers `SELECT 1` and a broker connection can be opened; "
    "otherwise 503, naming which failed (`checks`). Take the instance out of rotation while it fails.",
    responses={503: problem_responses(503)[503]},
)
def readyz(request: Request) -> Readiness:
    state = get_state(request)
    checks = {
        "database": "ok" if _database_ok(state) else "unavailable",
        "broker": "ok" if _broker_ok(state) else "unavailable",
    }
    failed = [name for name, result in checks.items() if result != "ok"]
    if failed:
        raise ProblemError(
            503,
            f"Not ready: {' and '.join(failed)} unavailable.",
            slug="not-ready",
            title="Service unavailable",
            checks=checks,
        )
    return Readiness(status="ready", checks=checks)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Request counts and latencies per route, scans created and images queued, in the "
    "Prometheus text format.",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format."}},
)
def metrics() -> Response:
    body, content_type = render()
    return Response(body, media_type=content_type)
