"""What every request handler of one API instance shares: settings, database, broker, limiter."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

from worker.settings import Settings

from .ratelimit import RateLimiter


@dataclass
class ApiState:
    settings: Settings
    sessions: sessionmaker[Session]
    celery: Celery
    rate_limiter: RateLimiter
    owns_celery: bool  # built by create_app, so closed with it


def get_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state
