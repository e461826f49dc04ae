"""One error hierarchy; its classes decide retry policy.

* :class:`PermanentError`: retrying cannot help (bad image, missing object).
  The image is marked ``failed`` with the error's ``code`` at once.
* :class:`TransientError`: the next attempt may succeed (throttling, timeouts,
  5xx, a database restart). Retried with exponential backoff and full jitter,
  a bounded number of times; after the last attempt the image is ``failed``
  with the error's ``code``.
* :class:`ConfigError`: the service itself is misconfigured (no checkpoint,
  bad settings). Raised at start-up, never per image.
* :class:`IntakeRefused`: a producer asked for something its client may not
  have (an object outside its grants, a lane it may not use, more work than
  its quota). Raised before any row or message exists; the API answers 403 or 429.
* Refusals of one request or call that are not about an image:
  :class:`IdempotencyConflict` (a reused key), :class:`UnsafeURL` (a callback
  URL the policy refuses), :class:`ImageNotFound`. They keep the stdlib base
  (``ValueError``, ``LookupError``) their callers catch.
"""

from __future__ import annotations

import random

# Error codes stored in ``images.error_code``. Documented in the README; a
# client may branch on them, so they never change meaning.
EMPTY_OBJECT = "empty_object"
OBJECT_TOO_LARGE = "object_too_large"
OBJECT_NOT_FOUND = "object_not_found"
ACCESS_DENIED = "access_denied"
UNSUPPORTED_FORMAT = "unsupported_format"
TOO_LARGE = "too_large"
CORRUPT_IMAGE = "corrupt_image"
DECODE_TIMEOUT = "decode_timeout"
STORAGE_UNAVAILABLE = "storage_unavailable"
INFERENCE_FAILED = "inference_failed"
DATABASE_UNAVAILABLE = "database_unavailable"
INTERNAL_ERROR = "internal_error"
TOO_MANY_ATTEMPTS = "too_many_attempts"


class SynthguardError(Exception):
    """Base of every error synthguard raises on purpose."""

    code: str = INTERNAL_ERROR
    transient: bool = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class PermanentError(SynthguardError):
    """Retrying cannot help; the image fails now with ``code``."""


class TransientError(SynthguardError):
    """The next attempt may succeed; retry with backoff and jitter."""

    transient = True


class ConfigError(SynthguardError):
    """The service is misconfigured; raised at start-up, not per image."""

    code = "config_error"


class CheckpointError(ConfigError):
    """The model checkpoint cannot be found, fetched or loaded."""

    code = "checkpoint_error"


class IntakeRefused(SynthguardError):
    """A request refused at intake, before anything was written; ``status`` is its HTTP answer."""

    code = "intake_refused"
    status = 403


class NotGranted(IntakeRefused):
    """An object outside the client's grants."""

    code = "not_granted"

    def __init__(self, message: str, *, bucket: str, key: str) -> None:
        super().__init__(message)
        self.bucket = bucket
        self.key = key


class LaneNotAllowed(IntakeRefused):
    """A lane the client may not queue on."""

    code = "lane_not_allowed"

    def __init__(self, message: str, *, lane: str, allowed: list[str]) -> None:
        super().__init__(message)
        self.lane = lane
        self.allowed = allowed


class QuotaExceeded(IntakeRefused):
    """More images queued and not yet done than the client's cap for the lane, or its image rate."""

    code = "quota_exceeded"
    status = 429

    def __init__(self, message: str, *, retry_after_s: int, limit: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit = limit


class ImageNotFound(SynthguardError, LookupError):
    """The image id is not in the database (a message that outlived its row)."""

    code = "image_not_found"


class IdempotencyConflict(SynthguardError, ValueError):
    """The idempotency key was used before with a different request."""

    code = "idempotency_conflict"


class UnsafeURL(SynthguardError, ValueError):
    """A callback URL the policy refuses; the message says exactly why."""

    code = "unsafe_url"


def backoff_delay(attempt: int, *, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based).

    Exponential backoff with "full jitter": a uniform draw in
    ``[0, min(cap, base * 2**(attempt-1))]``, so that many workers retrying the
    same outage spread out instead of stampeding together.
    """
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    ceiling = min(cap_s, base_s * (2 ** (attempt - 1)))
    return (rng or random).uniform(0.0, ceiling)
