"""API clients: keys shown once and stored hashed, webhook secrets, authentication."""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import ApiClient

KEY_PREFIX = "sg_"
SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(api_key: str) -> str:
    # 256 random bits need no slow hash: nothing to brute-force, and lookups stay O(1).
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class NewClient:
    """A client just created, with the only copy of its API key."""

    client: ApiClient
    api_key: str
    webhook_secret: str


def create_client(
    session: Session, name: str, *, webhook_url: str | None = None, default_threshold: float | None = None
) -> NewClient:
    api_key, secret = new_api_key(), new_webhook_secret()
    client = ApiClient(
        name=name,
        api_key_hash=hash_api_key(api_key),
        api_key_prefix=api_key[: len(KEY_PREFIX) + 6],
        webhook_url=webhook_url,
        webhook_secret=secret,
        default_threshold=default_threshold,
    )
    session.add(client)
    session.flush()
    return NewClient(client, api_key, secret)


def authenticate(session: Session, api_key: str) -> ApiClient | None:
    """The client holding ``api_key``, disabled or not; None when no client does."""
    if not api_key.startswith(KEY_PREFIX):
        return None
    return session.scalar(select(ApiClient).where(ApiClient.api_key_hash == hash_api_key(api_key)))
