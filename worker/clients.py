"""API clients: keys shown once and stored hashed, grants, rotation, webhook secrets.

Keys are 256 random bits compared by SHA-256; a rotated key keeps working
for the overlap the operator chose, then stops. Webhook secrets are stored
sealed by :class:`~worker.secretbox.SecretBox` and opened only to sign.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from .models import PRIORITIES, ApiClient, ClientGrant, utcnow
from .secretbox import SECRET_PREFIX, SecretBox
from .tenancy import Grant

KEY_PREFIX = "sg_"


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
    """A client just created, with the only copy of its API key and webhook secret."""

    client: ApiClient
    api_key: str
    webhook_secret: str


def normalize_hosts(hosts: Sequence[str]) -> list[str]:
    """Callback host names as compared at intake: lower case, no trailing dot, each once."""
    return sorted({host.lower().rstrip(".") for host in hosts})


def check_lanes(lanes: Sequence[str] | None) -> list[str] | None:
    if lanes is None:
        return None
    unknown = sorted(set(lanes) - set(PRIORITIES))
    if unknown or not lanes:
        raise ValueError(f"lanes must be some of {', '.join(PRIORITIES)}")
    return [lane for lane in PRIORITIES if lane in lanes]


def create_client(
    session: Session,
    name: str,
    *,
    grants: Sequence[Grant] = (),
    all_buckets: bool = False,
    webhook_url: str | None = None,
    default_threshold: float | None = None,
    lanes: Sequence[str] | None = None,
    max_pending_realtime: int | None = None,
    max_pending_bulk: int | None = None,
    images_per_minute: int | None = None,
    callback_hosts: Sequence[str] | None = None,
    box: SecretBox | None = None,
) -> NewClient:
    """Add a client; exactly one of ``grants`` and ``all_buckets`` says what it may reach."""
    if bool(grants) == bool(all_buckets):
        raise ValueError("a client needs grants (buckets or bucket/prefix) or all_buckets, and not both")
    api_key, secret = new_api_key(), new_webhook_secret()
    client = ApiClient(
        name=name,
        api_key_hash=hash_api_key(api_key),
        api_key_prefix=api_key[: len(KEY_PREFIX) + 6],
        all_buckets=all_buckets,
        lanes=check_lanes(lanes),
        max_pending_realtime=max_pending_realtime,
        max_pending_bulk=max_pending_bulk,
        images_per_minute=images_per_minute,
        callback_hosts=normalize_hosts(callback_hosts) if callback_hosts else None,
        webhook_url=webhook_url,
        webhook_secret=(box or SecretBox([])).seal(secret),
        default_threshold=default_threshold,
    )
    client.grants = [ClientGrant(bucket=g.bucket, prefix=g.prefix) for g in sorted(set(grants))]
    session.add(client)
    session.flush()
    return NewClient(client, api_key, secret)


class ClientNotFound(LookupError):
    """No client, or more than one, answers to a name."""


def find_client(session: Session, name_or_id: str) -> ApiClient:
    """The client with this id, or the one client with this name."""
    try:
        by_id = session.get(ApiClient, uuid.UUID(name_or_id))
    except ValueError:
        by_id = None
    if by_id is not None:
        return by_id
    matches = list(session.scalars(select(ApiClient).where(ApiClient.name == name_or_id)))
    if not matches:
        raise ClientNotFound(f"no API client named {name_or_id!r}; see `synthguard clients list`")
    if len(matches) > 1:
        raise ClientNotFound(f"{len(matches)} API clients are named {name_or_id!r}; name one by its id")
    return matches[0]


def add_grant(session: Session, client: ApiClient, grant: Grant) -> bool:
    """Grant ``grant``; False when the client had it already."""
    if any(Grant(g.bucket, g.prefix) == grant for g in client.grants):
        return False
    client.grants.append(ClientGrant(bucket=grant.bucket, prefix=grant.prefix))
    session.flush()
    return True


def remove_grant(session: Session, client: ApiClient, grant: Grant) -> bool:
    """Take ``grant`` away; False when the client did not have exactly it.

    Images already queued under it fail ``access_denied`` when a worker claims them.
    """
    kept = [g for g in client.grants if Grant(g.bucket, g.prefix) != grant]
    if len(kept) == len(client.grants):
        return False
    client.grants = kept
    session.flush()
    return True


def authenticate(session: Session, api_key: str) -> ApiClient | None:
    """The client holding ``api_key`` (current, or previous within its overlap), disabled or not."""
    if not api_key.startswith(KEY_PREFIX):
        return None
    digest = hash_api_key(api_key)
    client = session.scalar(
        select(ApiClient).where(or_(ApiClient.api_key_hash == digest, ApiClient.api_key_previous_hash == digest))
    )
    if client is None or client.api_key_hash == digest:
        return client
    until = client.api_key_previous_until
    return client if until is not None and until > utcnow() else None


def rotate_api_key(session: Session, client: ApiClient, *, overlap_s: float = 0.0) -> str:
    """Issue a new key; the current one keeps working ``overlap_s`` seconds (0: stops now)."""
    api_key = new_api_key()
    if overlap_s > 0:
        client.api_key_previous_hash = client.api_key_hash
        client.api_key_previous_until = utcnow() + timedelta(seconds=overlap_s)
    else:
        client.api_key_previous_hash = None
        client.api_key_previous_until = None
    session.flush()  # the old hash leaves its unique slot before the new one takes it
    client.api_key_hash = hash_api_key(api_key)
    client.api_key_prefix = api_key[: len(KEY_PREFIX) + 6]
    session.flush()
    return api_key


def disable_client(session: Session, client: ApiClient) -> bool:
    """Stop every key of the client at once (401 from then on); False when it was disabled already."""
    if client.disabled_at is not None:
        return False
    client.disabled_at = utcnow()
    session.flush()
    return True


# ------------------------------------------------------------------ webhook secrets


class SecretRotationConflict(Exception):
    """Rotating now would silently drop a previous secret that still signs."""

    def __init__(self, until: datetime) -> None:
        super().__init__(
            f"the previous webhook secret still signs until {until.isoformat()}; rotating again would drop "
            "it without warning. Revoke it first, or rotate with revoke_previous"
        )
        self.until = until


def signing_secrets(client: ApiClient, box: SecretBox, now: datetime | None = None) -> list[str]:
    """The secrets deliveries are signed with now: the current one, and the previous during its overlap."""
    now = now or utcnow()
    found = [box.open(client.webhook_secret)] if client.webhook_secret else []
    until = client.webhook_secret_previous_until
    if client.webhook_secret_previous and until is not None and until > now:
        # Rotation overlap: receivers still on the old secret keep verifying.
        found.append(box.open(client.webhook_secret_previous))
    return found


def rotate_webhook_secret(
    session: Session, client: ApiClient, box: SecretBox, *, overlap_s: float, revoke_previous: bool = False
) -> tuple[str, datetime | None]:
    """A new secret; returns it and until when the one it replaces still signs (None: not at all).

    Exactly two secrets at most: while a previous one still signs, rotating
    again raises :class:`SecretRotationConflict` unless ``revoke_previous``,
    which also ends the replaced secret at once (a leaked secret).
    """
    now = utcnow()
    until = client.webhook_secret_previous_until
    if not revoke_previous and client.webhook_secret_previous and until is not None and until > now:
        raise SecretRotationConflict(until)
    secret = new_webhook_secret()
    if revoke_previous or overlap_s <= 0:
        client.webhook_secret_previous = None
        client.webhook_secret_previous_until = None
    else:
        client.webhook_secret_previous = client.webhook_secret
        client.webhook_secret_previous_until = now + timedelta(seconds=overlap_s)
    client.webhook_secret = box.seal(secret)
    session.flush()
    return secret, client.webhook_secret_previous_until


def revoke_previous_secret(session: Session, client: ApiClient) -> bool:
    """The previous secret stops signing now; False when none was stored (expired ones count as stored)."""
    had = client.webhook_secret_previous is not None
    client.webhook_secret_previous = None
    client.webhook_secret_previous_until = None
    session.flush()
    return had


def encrypt_secrets(session: Session, box: SecretBox) -> int:
    """Seal every stored webhook secret under the box's first key; returns how many values changed."""
    changed = 0
    for client in session.scalars(select(ApiClient)):
        for column in ("webhook_secret", "webhook_secret_previous"):
            stored = getattr(client, column)
            if stored is None:
                continue
            resealed = box.reseal(stored)
            if resealed != stored:
                setattr(client, column, resealed)
                changed += 1
    session.flush()
    return changed
