"""Structured logging: JSON lines, per-request context, redaction.

A "request" is one task run in the worker and one HTTP request in the API.
Its ids (task, image, scan, delivery, request) live in a context variable, so
every line logged while it runs carries them without each call passing them.
Celery's thread pool runs each task in its own thread, and each thread has its
own context, so concurrent tasks never see each other's ids.

Object keys can carry personal data (KYC uploads are named after people), so
they are logged only when ``SYNTHGUARD_LOG_OBJECT_KEYS`` allows; otherwise the
bound key is also scrubbed from messages and tracebacks, whatever produced them.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal

LogFormat = Literal["json", "text"]

# Fields a line may carry from the context, in the order they are written.
CONTEXT_FIELDS = ("request_id", "task_id", "image_id", "scan_id", "delivery_id")
# Bound for scrubbing, written only when object keys may be logged.
KEY_FIELDS = ("bucket", "object_key")

KEY_PLACEHOLDER = "<object key>"

# Never mutated in place: each bind sets a new mapping, so an immutable empty default is safe.
_EMPTY: Mapping[str, str] = MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "synthguard_log_context", default=_EMPTY
)
_log_object_keys = False
_format: LogFormat = "text"

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
# Order matters: the header rule must see "Bearer sg_..." before the key rule shortens it.
_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(bearer\s+|basic\s+)?[^\s\"',}]+"), r"\1\2[REDACTED]"),
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+"), "Bearer [REDACTED]"),
    (re.compile(r"\bsg_[A-Za-z0-9_\-]{6,}"), "sg_[REDACTED]"),
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=_\-]{6,}"), "whsec_[REDACTED]"),
    # scheme://user:password@host: keep the user, drop the password.
    (re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@\"]*:)[^\s@/\"]+@"), r"\1[REDACTED]@"),
)


def redact(text: str) -> str:
    """``text`` with API keys, webhook secrets, Authorization values and URL passwords masked."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


# ------------------------------------------------------------------ context


def current_context() -> dict[str, str]:
    """The ids bound to the running request (a copy)."""
    return dict(_context.get())


def bind(**values: object) -> None:
    """Add ids to the running request's context (None values are skipped)."""
    merged = dict(_context.get())
    merged.update({k: str(v) for k, v in values.items() if v is not None})
    _context.set(merged)


def clear() -> None:
    """Forget the running request's ids (the thread takes the next one next)."""
    _context.set(_EMPTY)


@contextmanager
def bound(**values: object) -> Iterator[None]:
    """Bind ``values`` for the body of a ``with``, then restore what was there."""
    token = _context.set({**_context.get(), **{k: str(v) for k, v in values.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def _celery_ids(record: logging.LogRecord) -> dict[str, str]:
    """Ids from Celery's own "received"/"succeeded" lines, logged outside the task's context."""
    data = getattr(record, "data", None)
    if not isinstance(data, dict) or "id" not in data or "name" not in data:
        return {}
    ids = {"task_id": str(data["id"])}
    # The first argument of our tasks is the id of what they work on; argsrepr is a string.
    match = _UUID.search(str(data.get("args") or ""))
    if match:
        field = "delivery_id" if str(data["name"]).endswith("deliver_webhook") else "image_id"
        ids[field] = match.group(0)
    return ids


def _scrub_keys(text: str, context: Mapping[str, str]) -> str:
    key = context.get("object_key")
    if not key:
        return text
    bucket = context.get("bucket", "")
    # The URI first, so that "s3://bucket/" does not stay behind a scrubbed key.
    if bucket:
        text = re.sub(rf"s3://{re.escape(bucket)}/{re.escape(key)}(\?versionId=[\w.\-]+)?", KEY_PLACEHOLDER, text)
    return text.replace(key, KEY_PLACEHOLDER)


# --------------------------------------------------------------- formatters


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the request's ids, extras."""

    def format(self, record: logging.LogRecord) -> str:
        context = {**_celery_ids(record), **_context.get()}
        message = record.getMessage()
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for name in CONTEXT_FIELDS:
            if name in context:
                doc[name] = context[name]
        if _log_object_keys:
            for name in KEY_FIELDS:
                if name in context:
                    doc[name] = context[name]
        fields = getattr(record, "fields", None)  # log.info(..., extra={"fields": {...}})
        if isinstance(fields, Mapping):
            for name, value in fields.items():
                if _log_object_keys or name not in KEY_FIELDS:
                    doc.setdefault(str(name), value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        if not _log_object_keys:
            # Keys end up in messages and tracebacks through exception texts (storage errors).
            for name in ("message", "exception", "stack"):
                if name in doc:
                    doc[name] = _scrub_keys(doc[name], context)
        # json.dumps escapes newlines, so each record stays on one line.
        return redact(json.dumps(doc, default=str, ensure_ascii=False, separators=(",", ":")))


class TextFormatter(logging.Formatter):
    """The human format, with the request's ids appended and the same redaction."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        context = {**_celery_ids(record), **_context.get()}
        line = super().format(record)
        ids = " ".join(f"{name}={context[name]}" for name in CONTEXT_FIELDS if name in context)
        if ids:
            line = f"{line} [{ids}]"
        if not _log_object_keys:
            line = _scrub_keys(line, context)
        return redact(line)


def make_formatter(fmt: LogFormat) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


_HANDLER_NAME = "synthguard"


def configure_logging(
    fmt: LogFormat = "text", level: int | str = logging.WARNING, *, log_object_keys: bool = False
) -> logging.Handler:
    """Send the root logger's records to stderr in ``fmt``; idempotent (replaces our handler).

    Other handlers on the root (pytest's capture, for one) are left alone.
    """
    global _log_object_keys, _format
    _log_object_keys = log_object_keys
    _format = fmt
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(make_formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    # Python warnings too (Celery's superuser warning), so that a collector sees one format.
    logging.captureWarnings(fmt == "json")
    return handler


def current_format() -> LogFormat:
    """The format :func:`configure_logging` last installed ("text" before it ran)."""
    return _format


def is_configured() -> bool:
    """Whether :func:`configure_logging` has installed its handler in this process."""
    return any(h.get_name() == _HANDLER_NAME for h in logging.getLogger().handlers)


def install_celery_logging(fmt: LogFormat, *, log_object_keys: bool = False) -> None:
    """Make Celery's own logging setup (worker, beat) use ours, at its ``--loglevel``.

    A ``setup_logging`` receiver replaces Celery's configuration altogether, so
    its lines (task received, succeeded, retried) come out in the same format.
    """
    from celery.signals import setup_logging

    def receiver(loglevel: int | str | None = None, **_: object) -> None:
        configure_logging(fmt, loglevel or logging.INFO, log_object_keys=log_object_keys)

    # weak=False: the closure has no other reference and would be collected at once.
    setup_logging.connect(receiver, weak=False, dispatch_uid="synthguard.logs")
