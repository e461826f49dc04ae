"""Webhook secrets at rest: Fernet under ``SYNTHGUARD_SECRET_KEY``, rotatable with MultiFernet.

A stored secret is either a Fernet token (``gAAAAA...``) or, from before
encryption or on a trial install without a key, the plain ``whsec_...``
value. Reading accepts both, so an upgrade never breaks signing;
``synthguard clients encrypt-secrets`` rewrites plain and old-key values under
the first key. The API and worker refuse to start on PostgreSQL without a key
(:func:`require_secret_key`) unless ``SYNTHGUARD_ALLOW_PLAINTEXT_SECRETS`` says so.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .errors import ConfigError
from .settings import Settings

# What a Standard Webhooks secret starts with (and so an unencrypted one as stored). The one
# definition: signing (worker.webhooks) and issuing (worker.clients) import it from here.
SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret


def new_secret_key() -> str:
    """A fresh key for ``SYNTHGUARD_SECRET_KEY``."""
    return Fernet.generate_key().decode()


class SecretBox:
    """Encrypts with the first key, decrypts with any; without keys, values stay plain text."""

    def __init__(self, keys: list[str]) -> None:
        try:
            self._fernet = MultiFernet([Fernet(key.encode()) for key in keys]) if keys else None
        except ValueError as exc:
            raise ConfigError(
                "SYNTHGUARD_SECRET_KEY must be Fernet keys (32 url-safe base64 bytes), comma-separated; "
                "make one with `synthguard clients new-secret-key`"
            ) from exc

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        raw = settings.secret_key.get_secret_value() if settings.secret_key is not None else ""
        return cls([part.strip() for part in raw.split(",") if part.strip()])

    @property
    def encrypts(self) -> bool:
        return self._fernet is not None

    def seal(self, secret: str) -> str:
        """The value to store for ``secret``."""
        if self._fernet is None:
            return secret
        return self._fernet.encrypt(secret.encode()).decode()

    def open(self, stored: str) -> str:
        """The secret a stored value holds; ``ConfigError`` when no configured key opens it."""
        if is_plain(stored):
            return stored
        if self._fernet is None:
            raise ConfigError("a webhook secret is encrypted but SYNTHGUARD_SECRET_KEY is not set")
        try:
            return self._fernet.decrypt(stored.encode()).decode()
        except InvalidToken:
            raise ConfigError(
                "a webhook secret does not open with any key in SYNTHGUARD_SECRET_KEY "
                "(a key was removed before `synthguard clients encrypt-secrets` re-encrypted it)"
            ) from None

    def reseal(self, stored: str) -> str:
        """``stored`` under the first key (plain values encrypted, old-key tokens rotated)."""
        if self._fernet is None:
            raise ConfigError("SYNTHGUARD_SECRET_KEY is not set: there is nothing to encrypt with")
        if is_plain(stored):
            return self.seal(stored)
        try:
            return self._fernet.rotate(stored.encode()).decode()
        except InvalidToken:
            raise ConfigError(
                "a webhook secret does not open with any key in SYNTHGUARD_SECRET_KEY: put the key it was "
                "sealed with back (after the new one) and run this again"
            ) from None


def is_plain(stored: str | None) -> bool:
    """A stored webhook secret in plain text (``whsec_...``), not sealed."""
    return stored is not None and stored.startswith(SECRET_PREFIX)


def require_secret_key(settings: Settings, what: str) -> None:
    """Refuse to run ``what`` (the API, a worker) on PostgreSQL with secrets in plain text."""
    SecretBox.from_settings(settings)  # a malformed key fails here, at start, not at the first delivery
    if settings.secret_key is not None or settings.allow_plaintext_secrets:
        return
    if settings.database_url.startswith("postgresql"):
        raise ConfigError(
            f"{what} will not run on PostgreSQL without SYNTHGUARD_SECRET_KEY, which encrypts webhook "
            "secrets at rest: set it (make one with `synthguard clients new-secret-key`), or set "
            "SYNTHGUARD_ALLOW_PLAINTEXT_SECRETS=true for a trial"
        )
